"""Summaries of a simulated run: hit ratio, latency percentiles, load balance.

Load, per worker, is counted two ways: the requests routed to it (``load_*``: the trace
README's reference counts these) and the prompt tokens it prefilled (``prefill_*``: the
work they cost it, after cache hits). ``*_max_over_mean`` is the busiest worker over the mean;
Jain's fairness index is (sum x)^2 / (n * sum x^2): 1 when all are equal, 1/n when one
worker does everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bench.sim.cluster import Outcome


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ascending values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def jain(values: Sequence[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def summarise(outcome: Outcome, ideal_hit_ratio: float) -> dict[str, Any]:
    ttft = sorted(outcome.ttft_s)
    e2e = sorted(outcome.e2e_s)
    hit = outcome.hit_blocks / outcome.prompt_blocks if outcome.prompt_blocks else 0.0
    requests = outcome.requests_per_worker
    prefill = outcome.prefill_tokens_per_worker
    return {
        "hit_ratio": round(hit, 4),
        "ideal_hit_ratio": round(ideal_hit_ratio, 4),
        "hit_ratio_of_ideal": round(hit / ideal_hit_ratio, 4) if ideal_hit_ratio else None,
        "ttft_p50": round(percentile(ttft, 50), 4),
        "ttft_p90": round(percentile(ttft, 90), 4),
        "ttft_p99": round(percentile(ttft, 99), 4),
        "ttft_mean": round(sum(ttft) / len(ttft), 4),
        "e2e_p50": round(percentile(e2e, 50), 4),
        "e2e_p99": round(percentile(e2e, 99), 4),
        "load_max_over_mean": round(max_over_mean(requests), 4),
        "load_jain": round(jain(requests), 4),
        "prefill_max_over_mean": round(max_over_mean(prefill), 4),
        "prefill_jain": round(jain(prefill), 4),
        "requests_per_worker": {"min": min(requests), "max": max(requests)},
        "prefill_tokens": sum(prefill),
        "makespan_s": round(outcome.makespan_s, 1),
    }


COLUMNS = (("hit_ratio", "hit ratio", "{:.3f}"), ("ttft_p50", "TTFT p50 s", "{:.3f}"),
           ("ttft_p99", "TTFT p99 s", "{:.2f}"), ("load_max_over_mean", "load max/mean",
                                                    "{:.2f}"),
           ("load_jain", "Jain (requests)", "{:.3f}"),
           ("prefill_max_over_mean", "prefill max/mean", "{:.2f}"),
           ("cpu_s", "sim CPU s", "{:.0f}"))


def markdown(by_workers: Mapping[str, Mapping[str, Mapping[str, Any]]], ideal: float) -> str:
    """One table row per (workers, policy)."""
    head = "| workers | policy | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [f"Ideal hit ratio (one infinite cache): {ideal:.3f}", "", head,
             "|" + "---|" * (len(COLUMNS) + 2)]
    for workers, policies in by_workers.items():
        for name, result in policies.items():
            cells = [fmt.format(result[key]) if result.get(key) is not None else "-"
                     for key, _, fmt in COLUMNS]
            lines.append(f"| {workers} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
