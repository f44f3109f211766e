"""The worker fleet: the worker actors this process starts, stops and watches.

``WorkerSet`` is a set of worker actors of one pool. ``Fleet`` is what the launcher asks of
the workers it runs, whatever keeps their number: ``StaticFleet`` holds ``cluster.workers``
of them; the autoscaler (cluster/autoscaler.py) sizes each pool to its demand.

Ownership: `electron-serve up` runs attached workers (they die with its process).
`electron-serve worker`, a controller on a cluster, runs detached ones, named after its fleet
(``cluster.fleet``) and worker id: a controller that dies (SIGKILL, OOM, its pod or node
lost) leaves them serving, and the next controller of the fleet adopts the live ones at its
start (``WorkerSet.adopt``: no new actor, no model load; those above its size, and those
found draining because their previous controller was retiring them, are drained and
stopped). A controller stopped on purpose stops its workers (``stop``) unless told to
leave them (``release``, ``cluster.keep_workers_on_exit``).

Either replaces a lost worker: one whose process died (SIGKILL, OOM: Ray reports the actor
dead; actors are never restarted by Ray, ``max_restarts=0``), whose engine failed (its
``health()``: the engine thread died or a step stalled), or that is hung (it has answered no
check for ``cluster.worker_hung_after_s``: a frozen process or machine). ``StaticFleet`` checks every
``cluster.supervise_interval_s`` once its first worker serves, kills the lost ones and starts
new ones: the first at once, then, while they keep failing, after ``restart_backoff_s``
doubling up to ``restart_backoff_max_s``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import ray
from ray.exceptions import RayActorError

from core.aio import within
from core.config import Config
from workers.actor import create_worker_actor, find_worker_actors

log = logging.getLogger(__name__)

# Seconds a stopping worker gives in-flight generations before cancelling them.
WORKER_STOP_GRACE_S = 5.0
# A worker's health() must answer within this long (a slow answer is not a verdict).
HEALTH_TIMEOUT_S = 5.0


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

    @abc.abstractmethod
    async def release(self) -> None:
        """Stops keeping the fleet and leaves its workers serving (detached ones: for the
        fleet's next controller to adopt)."""

    @property
    @abc.abstractmethod
    def adopted(self) -> list[str]:
        """The workers taken over at ``start`` (a previous controller's), by id."""


class WorkerSet:
    """Worker actors of one pool, started by this process or adopted (``detached``: they
    outlive it; see the module's docstring)."""

    def __init__(self, config: Config, *, detached: bool = False):
        self._config = config
        self._detached = detached
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.addresses: dict[str, str] = {}
        self.failures: dict[str, RayActorError] = {}
        self._ready: dict[str, asyncio.Task[str | None]] = {}
        self._adopted: set[str] = set()
        # Adopted workers that were being retired (marked draining) when their controller
        # died: the fleet finishes retiring them (``take_found_draining``).
        self._found_draining: list[str] = []
        # When each worker that is not answering its checks was first asked in vain.
        self._silent_since: dict[str, float] = {}

    def start(self, count: int) -> list[str]:
        """Starts ``count`` more workers; returns their ids."""
        started = []
        for _ in range(count):
            worker_id = f"{self._config.cluster.pool}-{uuid.uuid4().hex[:8]}"
            self.actors[worker_id] = create_worker_actor(self._config, worker_id,
                                                         detached=self._detached)
            self._watch(worker_id)
            started.append(worker_id)
        return started

    def adopt(self) -> list[str]:
        """Takes the live worker actors of this fleet and pool that another process started
        (a controller that died) into the set; returns their ids. Their ``ready()`` answers
        at once when they serve (or when they have loaded, if they were still starting)."""
        pool = re.compile(re.escape(self._config.cluster.pool) + r"-[0-9a-f]{8}")
        found = find_worker_actors(self._config.cluster)
        adopted = sorted(w for w in found if pool.fullmatch(w) and w not in self.actors)
        for worker_id in adopted:
            self.actors[worker_id] = found[worker_id]
            self._adopted.add(worker_id)
            self._watch(worker_id)
        return adopted

    def take_found_draining(self) -> list[str]:
        """The adopted workers found marked draining since the last call: a previous
        controller was retiring them (they serve no new request; retire them for good)."""
        found, self._found_draining = self._found_draining, []
        return [w for w in found if w in self.actors]

    def _watch(self, worker_id: str) -> None:
        self._ready[worker_id] = asyncio.get_running_loop().create_task(
            self._await_ready(worker_id))

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
        if worker_id in self._adopted:
            try:
                if (await self.actors[worker_id].info.remote())["draining"]:
                    self._found_draining.append(worker_id)
            except RayActorError:
                pass  # gone since: the fleet's next check finds it lost
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

    def release(self) -> None:
        """Forgets every worker and leaves it running (detached: the fleet's next controller
        adopts it)."""
        for task in self._ready.values():
            task.cancel()
        self.actors.clear()
        self.addresses.clear()
        self._ready.clear()

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
        await asyncio.gather(*(stop_actor(wid, h, grace_s) for wid, h in handles))
        self.actors.clear()

    async def stop_one(self, worker_id: str, grace_s: float = WORKER_STOP_GRACE_S) -> None:
        """Stops one worker (gracefully when it serves) and forgets it."""
        handle, serving = self._forget(worker_id)
        if not serving:
            ray.kill(handle)
            return
        await stop_actor(worker_id, handle, grace_s)

    def kill(self, worker_id: str) -> None:
        """Kills one worker at once (it is lost: nothing to drain) and forgets it."""
        handle, _ = self._forget(worker_id)
        ray.kill(handle)

    def _forget(self, worker_id: str) -> tuple[ray.actor.ActorHandle, bool]:
        """Removes a worker from the set: its handle, and whether it was serving."""
        handle = self.actors.pop(worker_id)
        self._silent_since.pop(worker_id, None)
        task = self._ready.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.failures.pop(worker_id, None)
        return handle, self.addresses.pop(worker_id, None) is not None

    def answered(self, worker_id: str) -> None:
        """The worker answered a check (whatever it said)."""
        self._silent_since.pop(worker_id, None)

    def unanswered(self, worker_id: str, asked_at: float, error: BaseException) -> str | None:
        """The worker did not answer a check asked at ``asked_at`` in time (``error``). Says
        why it is lost once it has answered none for ``cluster.worker_hung_after_s``: a
        frozen process or machine, which Ray still reports alive. Before that, a late answer
        is no verdict (a busy worker, a Ray hiccup)."""
        silent = time.monotonic() - self._silent_since.setdefault(worker_id, asked_at)
        if silent >= self._config.cluster.worker_hung_after_s:
            return f"it has answered no check for {silent:.0f} s (hung)"
        log.warning("worker %s did not answer its check: %r", worker_id, error)
        return None

    async def reap(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, str]:
        """Kills and forgets the serving workers that are lost (process gone, engine failed,
        or hung) and the ones that failed to start; returns why each went, by id."""
        ids = list(self.addresses)
        asked_at = time.monotonic()
        answers = await asyncio.gather(
            *(within(self.actors[w].health.remote(), timeout_s) for w in ids),
            return_exceptions=True)
        lost = {w: f"it failed to start: {exc}" for w, exc in self.failures.items()}
        for worker_id, answer in zip(ids, answers):
            if isinstance(answer, RayActorError):
                lost[worker_id] = f"its process is gone: {answer}"
            elif isinstance(answer, str):
                lost[worker_id] = f"its engine failed: {answer}"
            elif isinstance(answer, BaseException):
                if why := self.unanswered(worker_id, asked_at, answer):
                    lost[worker_id] = why
            else:
                self.answered(worker_id)
        for worker_id, why in lost.items():
            log.error("worker %s is lost (%s); killing it", worker_id, why)
            self.kill(worker_id)
        return lost


async def stop_actor(worker_id: str, handle: ray.actor.ActorHandle,
                     grace_s: float) -> None:
    """A serving worker's ``stop()`` (bounded), then ``ray.kill``."""
    try:
        await within(handle.stop.remote(grace_s), grace_s + 10)
    except RayActorError:
        log.info("worker %s was already gone", worker_id)
    except Exception as exc:  # noqa: BLE001 - it is killed below whatever went wrong
        log.warning("worker %s did not stop cleanly: %r", worker_id, exc)
    ray.kill(handle)


async def run_every(interval_s: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    """Runs ``step`` every ``interval_s`` seconds until cancelled; a step that fails is logged
    and the next one runs (it may succeed)."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep going
            log.exception("%s failed", what)
        await asyncio.sleep(interval_s)


class StaticFleet(Fleet):
    """``cluster.workers`` workers of the shared pool, kept at that number (lost ones are
    replaced, with backoff: see the module docstring)."""

    def __init__(self, config: Config, *, detached: bool = False):
        self._config = config
        self.workers = WorkerSet(config, detached=detached)
        self._adopted: list[str] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        # Replacement rounds since every worker last served, and the earliest next one.
        self._restarts = 0
        self._next_start = 0.0
        # What the fleet has done: (monotonic time, "lost" or "start", worker id).
        self.events: list[tuple[float, str, str]] = []

    @property
    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        return self.workers.actors

    @property
    def addresses(self) -> dict[str, str]:
        return self.workers.addresses

    @property
    def adopted(self) -> list[str]:
        return list(self._adopted)

    def start(self) -> None:
        """Adopts the fleet's live workers, stops those above ``cluster.workers`` and starts
        the missing ones."""
        wanted = self._config.cluster.workers
        self._adopted = self.workers.adopt()
        now = time.monotonic()
        self.events.extend((now, "adopt", w) for w in self._adopted)
        for worker_id in self._adopted[wanted:]:
            log.warning("worker %s is one more than cluster.workers (%d): stopping it",
                        worker_id, wanted)
            self._retire_later(worker_id)
        self._start(max(0, wanted - len(self._adopted)))

    def _retire_later(self, worker_id: str) -> None:
        self.events.append((time.monotonic(), "retire", worker_id))
        task = asyncio.get_running_loop().create_task(self._retire(worker_id))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, worker_id: str) -> None:
        """Stops an adopted worker the fleet has no room for, gracefully once it answers."""
        handle = self.workers.actors[worker_id]
        with contextlib.suppress(RayActorError, TimeoutError):
            await within(handle.ready.remote(), HEALTH_TIMEOUT_S)
            await within(handle.drain.remote(), HEALTH_TIMEOUT_S)
        # Routers see the draining mark within a poll: then it leaves gracefully.
        await asyncio.sleep(2 * self._config.router.registry_poll_s)
        await self.workers.stop_one(worker_id)

    def _start(self, count: int) -> None:
        for worker_id in self.workers.start(count):
            self.events.append((time.monotonic(), "start", worker_id))

    async def wait_ready(self, minimum: int = 1) -> None:
        await self.workers.wait_ready(minimum)
        # From now on lost workers are replaced (a fleet that never served fails startup
        # instead of retrying for ever).
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name="fleet-supervisor")

    async def _supervise(self) -> None:
        interval = self._config.cluster.supervise_interval_s
        await asyncio.sleep(interval)
        await run_every(interval, self.step, "fleet supervision")

    async def step(self) -> None:
        """One check: kills the lost workers, starts replacements when the backoff allows."""
        cluster = self._config.cluster
        for worker_id in self.workers.take_found_draining():
            # Adopted while its previous controller retired it: it takes no new request.
            log.warning("adopted worker %s is draining: stopping it (a new one replaces it)",
                        worker_id)
            self._retire_later(worker_id)
        for worker_id in await self.workers.reap():
            self.events.append((time.monotonic(), "lost", worker_id))
        if len(self.workers.addresses) >= cluster.workers:
            self._restarts = 0
        missing = cluster.workers - len(self.workers.actors)
        now = time.monotonic()
        if missing <= 0 or now < self._next_start:
            return
        delay = min(cluster.restart_backoff_max_s,
                    cluster.restart_backoff_s * 2 ** self._restarts)
        self._restarts += 1
        self._next_start = now + delay
        log.warning("starting %d worker(s) to replace lost ones (next attempt no sooner than "
                    "%.0f s)", missing, delay)
        self._start(missing)

    async def _stop_supervising(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)

    async def stop(self) -> None:
        await self._stop_supervising()
        await self.workers.stop()

    async def release(self) -> None:
        await self._stop_supervising()
        self.workers.release()
