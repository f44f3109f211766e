"""What the engine thread records for metrics and traces, cheaply: plain integers and
timestamps, no OpenTelemetry or Prometheus calls inside the step loop.

``EngineStats`` holds monotonic counters that ``/metrics`` reads when scraped; a sequence's
``Timeline`` is read once it has finished (``RequestOutput.timeline``), by the gRPC handler,
which turns it into spans with explicit start and end times (``workers/observe.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Totals since the engine started (written by the engine thread only)."""

    steps: int = 0
    prompt_tokens: int = 0          # prompts of sequences that produced a first token
    cached_prompt_tokens: int = 0   # the part of those found in the prefix cache
    generation_tokens: int = 0      # sampled tokens
    preemptions: int = 0
    # Constrained sequences whose close the max_tokens budget forced (complete, "stop").
    structured_forced_closes: int = 0


@dataclass(eq=False)
class Timeline:
    """Wall-clock nanoseconds (``time.time_ns``: spans need epoch times) of one sequence's
    milestones. Preemption keeps the first-token time; recomputed prefill shows up as more
    chunks."""

    arrival_ns: int = field(default_factory=time.time_ns)
    scheduled_ns: int | None = None   # the first step that computed any of its tokens
    # (start_ns, end_ns, tokens) of each step that computed part of its prompt.
    prefill_chunks: list[tuple[int, int, int]] = field(default_factory=list)
    first_token_ns: int | None = None
    finished_ns: int | None = None
    num_preemptions: int = 0

    def prefill(self, start_ns: int, end_ns: int, tokens: int) -> None:
        if self.scheduled_ns is None:
            self.scheduled_ns = start_ns
        self.prefill_chunks.append((start_ns, end_ns, tokens))
