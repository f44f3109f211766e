"""Traces in the Mooncake format, for the routing simulator.

One JSON object per line: ``timestamp`` (ms), ``input_length``, ``output_length``,
``hash_ids`` (one id per block of the prompt, the last one possibly partial). The ids are
prefix-unique (an id always follows the same parent id: checked on the conversation trace),
so they serve as block hashes as they are, like the chained hashes of ``core.hashing``.

The conversation trace's arrivals come in ~3 s steps (up to 28 requests share one
timestamp); ``load_trace`` spreads the requests of one step evenly over it, in trace order,
so a replay is not a train of synchronised bursts that the trace's clock resolution made up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

# Characters per block in the text handed to ``cache_aware`` (which matches characters).
BLOCK_TEXT_CHARS = 16


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    arrival_s: float
    input_length: int
    output_length: int
    block_hashes: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)


def load_trace(path: str | Path, *, limit: int | None = None, speed: float = 1.0,
               spread: bool = True) -> list[TraceRequest]:
    """The trace's requests in arrival order. ``speed`` > 1 replays faster (arrival times
    divided by it); ``limit`` keeps the first requests."""
    if speed <= 0:
        raise ValueError("speed must be > 0")
    rows = []
    after: float | None = None  # the first later timestamp past the limit: where a step ends
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if limit is not None and len(rows) >= limit:
                if rows and row["timestamp"] != rows[-1]["timestamp"]:
                    after = row["timestamp"] / 1000.0
                    break
                continue
            rows.append(row)
    stamps = [row["timestamp"] / 1000.0 for row in rows]
    if any(b < a for a, b in zip(stamps, stamps[1:])):
        raise ValueError(f"{path}: timestamps are not in order")
    if spread:
        arrivals = spread_steps(stamps if after is None else [*stamps, after])[:len(stamps)]
    else:
        arrivals = stamps
    return [TraceRequest(i, t / speed, int(row["input_length"]), max(1, int(row["output_length"])),
                         tuple(int(h) for h in row["hash_ids"]))
            for i, (row, t) in enumerate(zip(rows, arrivals))]


def spread_steps(stamps: Sequence[float]) -> list[float]:
    """Requests sharing a timestamp spread evenly until the next distinct timestamp (the last
    step over the median step length)."""
    distinct = sorted(set(stamps))
    gaps = sorted(b - a for a, b in zip(distinct, distinct[1:]))
    last_gap = gaps[len(gaps) // 2] if gaps else 0.0
    following = {a: b for a, b in zip(distinct, distinct[1:])}
    out: list[float] = []
    i = 0
    while i < len(stamps):
        j = i
        while j < len(stamps) and stamps[j] == stamps[i]:
            j += 1
        start = stamps[i]
        width = following.get(start, start + last_gap) - start
        out.extend(start + width * k / (j - i) for k in range(j - i))
        i = j
    return out


def ideal_hit_ratio(requests: Iterable[TraceRequest]) -> float:
    """Hit blocks over all prompt blocks with one infinite cache: a request's hits are the
    leading run of its blocks that any earlier request had (the trace README's definition)."""
    seen: set[int] = set()
    hits = total = 0
    for request in requests:
        total += request.num_blocks
        for h in request.block_hashes:
            if h not in seen:
                break
            hits += 1
        seen.update(request.block_hashes)
    return hits / total if total else 0.0


class BlockText:
    """The text ``cache_aware`` sees: each block id becomes a fixed run of
    ``BLOCK_TEXT_CHARS`` pseudo-random hex characters, so equal prefixes are equal text and
    different blocks share about as few leading characters as different text does."""

    def __init__(self) -> None:
        self._memo: dict[int, str] = {}

    def block(self, block_id: int) -> str:
        text = self._memo.get(block_id)
        if text is None:
            text = xxhash.xxh3_64_hexdigest(block_id.to_bytes(8, "little"))[:BLOCK_TEXT_CHARS]
            self._memo[block_id] = text
        return text

    def of(self, request: TraceRequest) -> str:
        return "".join(self.block(h) for h in request.block_hashes)
