"""What a routing policy may know about one worker: ``WorkerView``.

A view is the worker's last reported ``WorkerLoad`` plus this router's own count of what it
has sent there (``LocalLoad``). Policies and the prefix index read views and nothing else, so
the discrete-event routing simulator drives the same policy code with simulated workers that
implement this protocol.

Plain Python: no gRPC, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as it last reported it (all zero until its first report)."""

    running: int = 0
    waiting: int = 0
    waiting_prefill_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    running_decode_tokens: int = 0


class WorkerView(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def load(self) -> WorkerLoad:
        """The latest load the worker reported."""
        ...

    @property
    def in_flight(self) -> int:
        """This router's requests at the worker that have not finished."""
        ...

    @property
    def in_flight_tokens(self) -> int:
        """Prefill tokens of this router's requests there that have not started (no first
        token yet)."""
        ...

    @property
    def not_started(self) -> int:
        """This router's requests at the worker that have no first token yet."""
        ...


class LocalLoad:
    """This router's own requests at one worker, counted from the moment they are sent.

    ``assign`` counts a request at once, before the worker can report it; its ``Assignment``
    takes it off ``not_started`` and its prefill tokens off when it starts (first token) and
    the request off ``in_flight`` when it finishes (a stream still being delivered to a slow
    client stays in ``in_flight`` after the worker is done with it).
    """

    __slots__ = ("in_flight", "in_flight_tokens", "not_started")

    def __init__(self) -> None:
        self.in_flight = 0
        self.in_flight_tokens = 0
        self.not_started = 0

    def assign(self, prefill_tokens: int) -> Assignment:
        self.in_flight += 1
        self.in_flight_tokens += prefill_tokens
        self.not_started += 1
        return Assignment(self, prefill_tokens)


class CountsLocalLoad:
    """The WorkerView's in-flight counts, read from a ``local: LocalLoad`` attribute; every
    worker kind (gRPC client, simulated, benchmark) mixes this in."""

    __slots__ = ()
    local: LocalLoad

    @property
    def in_flight(self) -> int:
        return self.local.in_flight

    @property
    def in_flight_tokens(self) -> int:
        return self.local.in_flight_tokens

    @property
    def not_started(self) -> int:
        return self.local.not_started


class Assignment:
    """One request's place in a ``LocalLoad``; ``started`` and ``finish`` are idempotent."""

    __slots__ = ("_local", "_tokens", "_started", "_finished")

    def __init__(self, local: LocalLoad, tokens: int):
        self._local = local
        self._tokens = tokens
        self._started = False
        self._finished = False

    def started(self) -> None:
        """Its prefill is done: its tokens no longer wait there."""
        if self._started:
            return
        self._started = True
        self._local.in_flight_tokens -= self._tokens
        self._local.not_started -= 1

    def finish(self) -> None:
        if self._finished:
            return
        self.started()
        self._finished = True
        self._local.in_flight -= 1


def queued_prefill_tokens(worker: WorkerView) -> int:
    """Prefill tokens waiting in the worker, counted like ``requests_at``. (Both terms are
    lower bounds: the report lags and omits the rest of a prefill already running; this
    router's count omits other routers' requests.)"""
    return max(worker.load.waiting_prefill_tokens, worker.in_flight_tokens)


def queued_requests(worker: WorkerView) -> int:
    """Requests waiting in the worker's queue: what it reported waiting, or this router's
    requests there that have no first token yet when that is more (sent since the report).
    Requests running or finished there and still being delivered are not queued."""
    return max(worker.load.waiting, worker.not_started)


def requests_at(worker: WorkerView) -> int:
    """Requests in the worker: the larger of what it reported (which includes other routers'
    requests) and what this router has in flight there (which includes requests sent since the
    last report); the maximum counts each request once either way."""
    load = worker.load
    return max(load.running + load.waiting, worker.in_flight)
