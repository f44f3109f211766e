"""Routing policies: which connected worker serves the next request.

A policy sees each candidate's last reported ``WorkerLoad`` and the router's own count of
requests it has sent there and not seen finish (``in_flight``). The pool increments
``in_flight`` as soon as a policy has chosen, so a burst arriving between two load reports
(~100 ms apart) spreads over the workers instead of piling onto the one that looked idlest.

Plain Python: no gRPC, no torch; the cache-aware policy of the next issue plugs in here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as it last reported it (all zero until its first report)."""

    running: int = 0
    waiting: int = 0
    waiting_prefill_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    running_decode_tokens: int = 0


class Candidate(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def load(self) -> WorkerLoad: ...

    @property
    def in_flight(self) -> int: ...


C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about the request being routed."""

    request_id: str
    num_prompt_tokens: int


@dataclass(frozen=True)
class Choice(Generic[C]):
    worker: C
    reason: str  # why this worker, for logs and traces


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[C], request: RequestInfo) -> Choice[C]:
        """Pick one of ``candidates`` (never empty, in a stable order)."""
        ...


class RoundRobin:
    """Each worker in turn, whatever its load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[C], request: RequestInfo) -> Choice[C]:
        worker = candidates[next(self._counter) % len(candidates)]
        return Choice(worker, "round_robin")


def load_score(worker: Candidate) -> int:
    """Queued prefill tokens plus requests in the worker.

    The request count is the larger of what the worker reported (which includes other
    routers' requests) and what this router has in flight there (which includes requests
    sent since the last report): taking the maximum counts each request once either way.
    """
    load = worker.load
    return load.waiting_prefill_tokens + max(load.running + load.waiting, worker.in_flight)


class LeastLoad:
    """The worker with the lowest ``load_score``; equal scores take turns."""

    name = "least_load"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[C], request: RequestInfo) -> Choice[C]:
        scores = [load_score(w) for w in candidates]
        best = min(scores)
        tied = [w for w, s in zip(candidates, scores) if s == best]
        worker = tied[next(self._counter) % len(tied)]
        load = worker.load
        return Choice(worker, (
            f"least_load score={best} waiting_prefill_tokens={load.waiting_prefill_tokens} "
            f"running={load.running} waiting={load.waiting} in_flight={worker.in_flight} "
            f"tied={len(tied)}"))


PolicyName = Literal["least_load", "round_robin"]


def make_policy(name: PolicyName) -> RoutingPolicy:
    if name == "least_load":
        return LeastLoad()
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown routing policy {name!r}")
