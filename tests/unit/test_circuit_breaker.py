"""The circuit breaker's states, driven by an explicit clock."""

from __future__ import annotations

import pytest

from router.fleet.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, open_s=10.0, clock=clock)


def fail(breaker: CircuitBreaker, worker_id: str, times: int) -> None:
    for _ in range(times):
        breaker.dispatched(worker_id)
        breaker.failed(worker_id)


def test_unknown_worker_is_closed_and_admitted(breaker):
    assert breaker.state("w0") is BreakerState.CLOSED and breaker.admits("w0")


def test_failures_below_the_threshold_keep_the_worker_in(breaker):
    fail(breaker, "w0", 2)
    assert breaker.admits("w0") and breaker.state("w0") is BreakerState.CLOSED


def test_consecutive_failures_open_the_circuit_for_open_s(breaker, clock, caplog):
    fail(breaker, "w0", 3)
    assert breaker.state("w0") is BreakerState.OPEN and not breaker.admits("w0")
    assert "circuit open" in caplog.text
    clock.now += 9.9
    assert not breaker.admits("w0")
    assert breaker.admits("w1")  # per worker


def test_a_success_resets_the_consecutive_count(breaker):
    fail(breaker, "w0", 2)
    breaker.succeeded("w0")
    fail(breaker, "w0", 2)
    assert breaker.admits("w0")


def test_after_open_s_one_probe_is_admitted(breaker, clock):
    fail(breaker, "w0", 3)
    clock.now += 10.0
    assert breaker.state("w0") is BreakerState.HALF_OPEN and breaker.admits("w0")
    breaker.dispatched("w0")
    assert not breaker.admits("w0")  # one probe at a time


def test_probe_success_closes_the_circuit(breaker, clock):
    fail(breaker, "w0", 3)
    clock.now += 10.0
    breaker.dispatched("w0")
    breaker.succeeded("w0")
    assert breaker.state("w0") is BreakerState.CLOSED and breaker.admits("w0")
    fail(breaker, "w0", 2)
    assert breaker.admits("w0")  # the count starts again from zero


def test_probe_failure_opens_the_circuit_again(breaker, clock):
    fail(breaker, "w0", 3)
    clock.now += 10.0
    fail(breaker, "w0", 1)
    assert breaker.state("w0") is BreakerState.OPEN
    clock.now += 9.0
    assert not breaker.admits("w0")
    clock.now += 1.0
    assert breaker.admits("w0")


def test_abandoned_probe_lets_the_next_request_probe(breaker, clock):
    fail(breaker, "w0", 3)
    clock.now += 10.0
    breaker.dispatched("w0")
    breaker.abandoned("w0")
    assert breaker.admits("w0")


def test_late_failure_of_a_request_sent_before_opening_does_not_extend_it(breaker, clock):
    fail(breaker, "w0", 3)
    clock.now += 5.0
    breaker.failed("w0")
    clock.now += 5.0
    assert breaker.state("w0") is BreakerState.HALF_OPEN


def test_removed_worker_comes_back_closed(breaker):
    fail(breaker, "w0", 3)
    breaker.remove("w0")
    assert breaker.admits("w0")


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0, open_s=10.0)
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=3, open_s=0)
