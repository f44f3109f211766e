"""What the cluster, the routers and the workers agree a worker is: its endpoint, as the
registry (cluster/registry.py) holds it, and where a router learns the current set.

Plain types: no Ray, gRPC or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# The registry actor's name in its Ray namespace: workers register with it, routers read it.
REGISTRY_NAME = "electron-registry"
# The custom Ray resource the head node declares (`electron-serve up`'s local Ray, the Helm
# chart's head): the registry asks for a sliver of it, so it is placed on the head and
# restarted there, never on a GPU node that may go away. A cluster without it (a Ray started
# by hand) places the registry anywhere.
HEAD_RESOURCE = "electron_head"


@dataclass(frozen=True)
class WorkerEndpoint:
    worker_id: str
    address: str  # host:port of the worker's gRPC server
    model: str    # the public model id it serves
    pool: str
    metrics_address: str = ""  # host:port of its Prometheus /metrics ("": none)
    # Being retired (the autoscaler's scale-down): routers send it no new requests and
    # purge it from their prefix index; its running requests finish.
    draining: bool = False


class IncompleteListing(Exception):
    """The source cannot tell yet which workers are gone: ``workers`` are alive, others may be
    too (a registry that restarted and is being rebuilt by the workers' heartbeats, or that
    cannot be reached). A router keeps the workers it knows meanwhile."""

    def __init__(self, why: str, workers: list[WorkerEndpoint] | None = None):
        super().__init__(why)
        self.workers = list(workers or ())


class WorkerSource(Protocol):
    """Where a router learns the current set of workers. ``list_workers`` raises
    ``IncompleteListing`` when its answer may leave live workers out."""

    async def list_workers(self) -> list[WorkerEndpoint]:
        ...


class StaticWorkerSource:
    """A fixed set of workers (tests, benches, a router pointed at known addresses)."""

    def __init__(self, workers: list[WorkerEndpoint]):
        self._workers = list(workers)

    async def list_workers(self) -> list[WorkerEndpoint]:
        return list(self._workers)
