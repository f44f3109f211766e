"""The registry: how routers learn which workers exist.

Workers register ``{worker_id, address, model, pool, draining}`` with one named Ray actor and heartbeat
every ``cluster.heartbeat_s``; an entry whose last heartbeat is older than
``cluster.worker_ttl_s`` is dropped, so a worker killed without a word (``ray.kill`` is
SIGKILL, a node lost) disappears on its own. Routers poll through a ``WorkerSource``.

Timing (defaults): heartbeat 0.5 s, TTL 1.5 s, router poll 0.5 s, so a dead worker leaves a
router's view at most TTL + poll = 2 s after its last heartbeat; a started worker registers
before it reports ready and is seen within one poll.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from core.config import ClusterConfig
from core.endpoints import REGISTRY_NAME, WorkerEndpoint
from workers.actor import lookup_registry


class Registry:
    """Worker endpoints and their last heartbeat. Runs as a Ray actor (see ``registry_actor``).

    Invariant: every entry in ``_workers`` has an entry in ``_seen`` (monotonic seconds).
    """

    def __init__(self, worker_ttl_s: float):
        self._ttl = worker_ttl_s
        self._workers: dict[str, WorkerEndpoint] = {}
        self._seen: dict[str, float] = {}

    def register(self, endpoint: WorkerEndpoint) -> None:
        self._workers[endpoint.worker_id] = endpoint
        self._seen[endpoint.worker_id] = time.monotonic()

    def deregister(self, worker_id: str) -> bool:
        self._seen.pop(worker_id, None)
        return self._workers.pop(worker_id, None) is not None

    def heartbeat(self, worker_id: str) -> bool:
        """Refreshes a worker's entry; False when it is unknown (expired): register again."""
        self._expire()
        if worker_id not in self._workers:
            return False
        self._seen[worker_id] = time.monotonic()
        return True

    def list(self) -> list[WorkerEndpoint]:
        self._expire()
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def _expire(self) -> None:
        deadline = time.monotonic() - self._ttl
        for worker_id in [w for w, seen in self._seen.items() if seen < deadline]:
            del self._seen[worker_id]
            del self._workers[worker_id]


def registry_actor(cluster: ClusterConfig, *, detached: bool) -> ray.actor.ActorHandle:
    """The registry actor of ``cluster.namespace``, created if it does not exist yet.

    ``detached`` (cluster mode) keeps it alive after the process that created it exits, so
    workers and routers started by separate commands share it; ``electron-serve up`` owns
    its registry and it dies with it.
    """
    options: dict[str, object] = dict(
        name=REGISTRY_NAME, namespace=cluster.namespace, get_if_exists=True,
        # Bookkeeping only: it must not take a CPU that a worker needs to be scheduled.
        num_cpus=0, max_restarts=-1 if detached else 0)
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(Registry).options(**options).remote(cluster.worker_ttl_s)


class RayWorkerSource:
    """The workers registered with the registry actor of ``namespace`` (Ray is initialised)."""

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._registry: ray.actor.ActorHandle | None = None

    async def list_workers(self) -> list[WorkerEndpoint]:
        if self._registry is None:
            self._registry = lookup_registry(self._namespace)
            if self._registry is None:
                return []
        try:
            return await self._registry.list.remote()
        except RayActorError:
            # The registry died (a detached one restarts under the same name): look it up
            # again on the next poll; this poll has no answer to give.
            self._registry = None
            raise
