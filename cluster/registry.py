"""The registry: how routers learn which workers exist.

Workers register ``{worker_id, address, model, pool, draining}`` with one named Ray actor and
heartbeat every ``cluster.heartbeat_s`` with that same full record; an entry whose last
heartbeat is older than ``cluster.worker_ttl_s`` is dropped, so a worker killed without a word
(``ray.kill`` is SIGKILL, a node lost) disappears on its own. Routers poll through a
``WorkerSource``.

Timing (defaults): heartbeat 0.5 s, TTL 1.5 s, router poll 0.5 s, so a dead worker leaves a
router's view at most TTL + poll = 2 s after its last heartbeat; a started worker registers
before it reports ready and is seen within one poll.

No single point of failure: the registry holds nothing the workers cannot tell it again.
Ray restarts it (``max_restarts=-1``) on the head node (it asks for a sliver of the head's
``HEAD_RESOURCE`` where a node offers it); a restarted registry starts empty and the next
heartbeat of each live worker re-registers it (the heartbeat carries the whole record, the
draining mark included). Until every live worker had the time to do so (``warmup_s`` after the
restart) its listing is incomplete: ``RayWorkerSource`` raises ``IncompleteListing`` and
routers keep the workers they know (router/fleet/pool.py). Every call to it, from workers and
routers, is bounded by ``cluster.registry_timeout_s``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import ray
from ray.exceptions import RayActorError

from core.aio import within
from core.config import ClusterConfig
from core.endpoints import (
    HEAD_RESOURCE,
    REGISTRY_NAME,
    IncompleteListing,
    WorkerEndpoint,
)
from workers.actor import lookup_registry

log = logging.getLogger(__name__)

# What the registry asks of the head's HEAD_RESOURCE: any positive amount pins it there.
HEAD_SHARE = 0.001


class Registry:
    """Worker endpoints and their last heartbeat. Runs as a Ray actor (see ``registry_actor``).

    Invariant: every entry in ``_workers`` has an entry in ``_seen`` (monotonic seconds).
    """

    def __init__(self, worker_ttl_s: float, warmup_s: float = 0.0):
        """``warmup_s``: after a restart, how long its listing stays incomplete (every live
        worker heartbeats within it)."""
        self._ttl = worker_ttl_s
        self._workers: dict[str, WorkerEndpoint] = {}
        self._seen: dict[str, float] = {}
        self._complete_at = time.monotonic() + (warmup_s if _restarted_actor() else 0.0)

    def register(self, endpoint: WorkerEndpoint) -> None:
        self._workers[endpoint.worker_id] = endpoint
        self._seen[endpoint.worker_id] = time.monotonic()

    def deregister(self, worker_id: str) -> bool:
        self._seen.pop(worker_id, None)
        return self._workers.pop(worker_id, None) is not None

    def heartbeat(self, endpoint: WorkerEndpoint) -> bool:
        """Refreshes a worker's entry with its full record; False when it was unknown (the
        registry restarted, or the worker stalled past the TTL) and is registered again."""
        self._expire()
        known = endpoint.worker_id in self._workers
        self.register(endpoint)
        return known

    def list(self) -> tuple[list[WorkerEndpoint], bool]:
        """The registered workers, and whether that is all of them (False while a restarted
        registry is still being rebuilt by heartbeats)."""
        self._expire()
        workers = sorted(self._workers.values(), key=lambda w: w.worker_id)
        return workers, time.monotonic() >= self._complete_at

    def _expire(self) -> None:
        deadline = time.monotonic() - self._ttl
        for worker_id in [w for w, seen in self._seen.items() if seen < deadline]:
            del self._seen[worker_id]
            del self._workers[worker_id]


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray has restarted."""
    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray's own use of its deprecated actor_id inside
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)


def registry_actor(cluster: ClusterConfig, *, detached: bool) -> ray.actor.ActorHandle:
    """The registry actor of ``cluster.namespace``, created if it does not exist yet.

    ``detached`` (cluster mode) keeps it alive after the process that created it exits, so
    workers and routers started by separate commands share it; ``electron-serve up`` owns
    its registry and it dies with it. Either way Ray restarts it when it dies.
    """
    options: dict[str, Any] = dict(
        name=REGISTRY_NAME, namespace=cluster.namespace, get_if_exists=True,
        # Bookkeeping only: it must not take a CPU that a worker needs to be scheduled.
        num_cpus=0, max_restarts=-1)
    if ray.cluster_resources().get(HEAD_RESOURCE, 0) > 0:
        options["resources"] = {HEAD_RESOURCE: HEAD_SHARE}
    else:
        log.info("no Ray node offers %r: the registry may be placed on any node",
                 HEAD_RESOURCE)
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(Registry).options(**options).remote(
        cluster.worker_ttl_s, warmup_s(cluster))


def warmup_s(cluster: ClusterConfig) -> float:
    """How long a restarted registry's listing stays incomplete: a worker's heartbeat may be
    stuck for ``registry_timeout_s`` on the dying registry, and the next one comes within the
    TTL."""
    return cluster.worker_ttl_s + cluster.registry_timeout_s


class RayWorkerSource:
    """The workers registered with the registry actor of ``namespace`` (Ray is initialised).

    ``IncompleteListing`` while the registry is missing, being restarted or rebuilt, or does
    not answer within ``timeout_s``: routers keep their workers through such a gap."""

    def __init__(self, namespace: str, timeout_s: float = ClusterConfig().registry_timeout_s):
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._registry: ray.actor.ActorHandle | None = None

    async def list_workers(self) -> list[WorkerEndpoint]:
        if self._registry is None:
            self._registry = lookup_registry(self._namespace)
            if self._registry is None:
                raise IncompleteListing(f"no registry actor in Ray namespace "
                                        f"{self._namespace!r} (yet)")
        try:
            workers, complete = await within(self._registry.list.remote(), self._timeout_s)
        except TimeoutError:
            raise IncompleteListing(f"the registry did not answer within "
                                    f"{self._timeout_s:g} s") from None
        except RayActorError as exc:
            # The registry died (Ray restarts it under the same name): look it up again on
            # the next poll; this poll has no answer to give.
            self._registry = None
            raise IncompleteListing(f"the registry is unavailable: {exc}") from None
        if not complete:
            raise IncompleteListing("the registry restarted and is being rebuilt from the "
                                    "workers' heartbeats", workers)
        return workers
