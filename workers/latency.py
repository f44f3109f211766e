"""The worker's recent times to first token, which it reports to the autoscaler
(cluster/demand.py turns them into a pool's pressure). Plain Python."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class RecentLatencies:
    """Latencies observed in the last ``window_s`` seconds (at most ``max_samples``)."""

    def __init__(self, window_s: float = 15.0, max_samples: int = 2048,
                 clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._clock = clock

    def record(self, seconds: float) -> None:
        self._samples.append((self._clock(), seconds))

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the recent samples (nearest rank); None when there are none."""
        deadline = self._clock() - self._window_s
        while self._samples and self._samples[0][0] < deadline:
            self._samples.popleft()
        if not self._samples:
            return None
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
