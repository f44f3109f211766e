"""How loaded a worker pool is, and how many workers it should have.

Plain Python (no Ray, gRPC or torch): the worker records its time to first token
(``workers.latency.RecentLatencies``) and reports it; the autoscaler (cluster/autoscaler.py) turns the workers' reports into
a ``PoolDemand`` and asks a ``ScaleDecider`` for the pool's target size.

The rule: a pool's *pressure* is the largest of four ratios against its targets
(``core.config.PoolConfig``) — waiting prefill tokens per worker, KV usage, recent p90 time
to first token, requests per worker. Pressure above 1 scales up at once to
``ceil(serving * pressure)`` workers (at most ``max_step_up`` more per step, one step per
``scale_up_cooldown_s``); pressure below ``scale_down_utilization`` for ``scale_down_delay_s``
removes one worker (one per ``scale_down_cooldown_s``). Below the pool's minimum it grows at
once; it never exceeds its maximum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.config import AutoscalerConfig, PoolConfig


@dataclass(frozen=True)
class WorkerDemand:
    """One serving worker's report (``WorkerActor.info``)."""

    worker_id: str
    running: int = 0
    waiting: int = 0
    waiting_prefill_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    ttft_p90_s: float | None = None

    @classmethod
    def from_info(cls, info: dict) -> WorkerDemand:
        return cls(worker_id=info["worker_id"], running=info.get("running", 0),
                   waiting=info.get("waiting", 0),
                   waiting_prefill_tokens=info.get("waiting_prefill_tokens", 0),
                   kv_blocks_used=info.get("kv_blocks_used", 0),
                   kv_blocks_total=info.get("kv_blocks_total", 0),
                   ttft_p90_s=info.get("ttft_p90_s"))

    @property
    def requests(self) -> int:
        return self.running + self.waiting


def pressure(pool: PoolConfig, workers: Sequence[WorkerDemand]) -> tuple[float, str]:
    """The pool's pressure (1.0: at its targets) and which signal sets it."""
    if not workers:
        return 0.0, "no serving worker"
    n = len(workers)
    kv = [w.kv_blocks_used / w.kv_blocks_total for w in workers if w.kv_blocks_total]
    ttfts = [w.ttft_p90_s for w in workers if w.ttft_p90_s is not None]
    ratios = {
        "waiting_prefill_tokens": sum(w.waiting_prefill_tokens for w in workers)
        / (n * pool.target_waiting_prefill_tokens),
        "kv_usage": (sum(kv) / len(kv) if kv else 0.0) / pool.target_kv_usage,
        "ttft_p90": max(ttfts, default=0.0) / pool.target_ttft_s,
        "requests": sum(w.requests for w in workers) / (n * pool.target_requests_per_worker),
    }
    signal = max(ratios, key=lambda k: ratios[k])
    return ratios[signal], signal


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str


class ScaleDecider:
    """One pool's target size over time: the hysteresis and cooldowns live here."""

    def __init__(self, pool: PoolConfig, settings: AutoscalerConfig,
                 clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self._settings = settings
        self._clock = clock
        self._last_up = -math.inf
        self._last_down = -math.inf
        self._low_since: float | None = None

    def decide(self, workers: Sequence[WorkerDemand], current: int) -> Decision:
        """The target for a pool with ``current`` workers (serving or starting, not draining),
        of which ``workers`` serve."""
        pool, s, now = self.pool, self._settings, self._clock()
        if current < pool.min_workers:
            self._last_up = now
            return Decision(pool.min_workers, f"below the minimum of {pool.min_workers}")
        if current > pool.max_workers:
            return Decision(pool.max_workers, f"above the maximum of {pool.max_workers}")
        value, signal = pressure(pool, workers)
        if value > 1.0:
            self._low_since = None
            wanted = min(pool.max_workers, current + s.max_step_up,
                         math.ceil(len(workers) * value))
            if wanted > current and now - self._last_up >= s.scale_up_cooldown_s:
                self._last_up = now
                return Decision(wanted, f"{signal} at {value:.2f}x its target")
            return Decision(current, f"{signal} at {value:.2f}x its target (holding)")
        if value >= s.scale_down_utilization or len(workers) < current:
            # Busy enough, or a worker is still starting: demand is not settled.
            self._low_since = None
            return Decision(current, f"{signal} at {value:.2f}x its target")
        if self._low_since is None:
            self._low_since = now
        low_for = now - self._low_since
        if (current > pool.min_workers and low_for >= s.scale_down_delay_s
                and now - self._last_down >= s.scale_down_cooldown_s
                and now - self._last_up >= s.scale_down_cooldown_s):
            self._last_down = now
            return Decision(current - 1, f"demand low ({signal} {value:.2f}x) for "
                                         f"{low_for:.0f} s")
        return Decision(current, f"demand low ({signal} {value:.2f}x) for {low_for:.0f} s")
