"""Circuit breaker: keeps a failing worker out of routing for a while.

Per worker, three states:

- CLOSED: routable. ``failure_threshold`` consecutive failures open the circuit.
- OPEN: not routable until ``open_s`` seconds after it opened.
- HALF_OPEN: the open time is over; one request (the probe) may go there. Its success closes
  the circuit, its failure opens it again for ``open_s``; a probe that ends with neither (the
  client left first) lets the next request probe instead.

A failure is a worker failing a request before its first token (``WorkerUnavailable``: it
errored, vanished or timed out); a success is a first token. Requests that a worker rejects
for their own content (400s) are neither: a bad request says nothing about the worker.

The pool filters candidates with ``admits`` and reports outcomes; the clock is injected so the
routing simulator can drive it. Plain Python.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Circuit:
    failures: int = 0                 # consecutive, while closed
    open_until: float | None = None   # set while open or half-open
    probing: bool = False             # a half-open probe is in flight


class CircuitBreaker:
    def __init__(self, failure_threshold: int, open_s: float,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def state(self, worker_id: str) -> BreakerState:
        circuit = self._circuits.get(worker_id)
        if circuit is None or circuit.open_until is None:
            return BreakerState.CLOSED
        if self._clock() < circuit.open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def admits(self, worker_id: str) -> bool:
        """May a request go to this worker now?"""
        state = self.state(worker_id)
        if state is BreakerState.HALF_OPEN:
            return not self._circuits[worker_id].probing
        return state is BreakerState.CLOSED

    def dispatched(self, worker_id: str) -> None:
        """A request was sent there: in HALF_OPEN it is the probe."""
        if self.state(worker_id) is BreakerState.HALF_OPEN:
            self._circuits[worker_id].probing = True

    def succeeded(self, worker_id: str) -> None:
        circuit = self._circuits.pop(worker_id, None)
        if circuit is not None and circuit.open_until is not None:
            log.info("worker %s: circuit closed (a request succeeded)", worker_id)

    def failed(self, worker_id: str) -> None:
        circuit = self._circuits.setdefault(worker_id, _Circuit())
        if circuit.open_until is not None:
            if self._clock() >= circuit.open_until:  # the probe failed
                self._open(worker_id, circuit, "its probe request failed")
            return  # a request sent before the circuit opened failed too: already open
        circuit.failures += 1
        if circuit.failures >= self.failure_threshold:
            self._open(worker_id, circuit, f"{circuit.failures} consecutive failures")

    def abandoned(self, worker_id: str) -> None:
        """A request there ended with no verdict (the client left before its first token)."""
        circuit = self._circuits.get(worker_id)
        if circuit is not None:
            circuit.probing = False

    def remove(self, worker_id: str) -> None:
        """The worker left: a worker that comes back starts CLOSED."""
        self._circuits.pop(worker_id, None)

    def _open(self, worker_id: str, circuit: _Circuit, why: str) -> None:
        circuit.open_until = self._clock() + self.open_s
        circuit.probing = False
        circuit.failures = 0
        log.warning("worker %s: circuit open for %.1f s (%s)", worker_id, self.open_s, why)
