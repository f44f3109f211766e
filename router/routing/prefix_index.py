"""The prefix index: which workers hold which KV blocks, by block hash.

Each worker's ``WatchState`` stream feeds one ``WorkerBlocks`` handle: a snapshot, then
consecutive events (stored, removed, cleared). An event whose sequence number is not the next
one is refused (``False``): the caller re-opens the stream and resets from a new snapshot. A
worker that leaves is purged at once. Every router replica keeps its own index from its own
streams; all of them converge on each worker's exact cached set.

The router also records its own assignments as *pending* blocks: the blocks a request it just
sent will store on its worker, until its predicted prefill time has passed (by then the
worker's events say the same). A burst of requests sharing a new prefix therefore sees the
prefix on the worker that got the first of them before any event comes back.

Layout: each joined worker owns one bit; ``_cached`` maps a hash to the bit mask of the workers
that hold it and ``_pending`` to those expected to. Matching a prompt against every worker is
one pass over its block hashes: the mask of workers still matching shrinks block by block, and
a worker's match length is the position where its bit drops out.

Plain Python: no gRPC, no torch.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefixMatch:
    """Per worker, how many leading blocks of a prompt it holds: ``blocks`` counts cached and
    pending blocks, ``cached`` only those its events reported. Absent workers match 0."""

    blocks: dict[str, int]
    cached: dict[str, int]

    def of(self, worker_id: str) -> int:
        return self.blocks.get(worker_id, 0)


NO_MATCH = PrefixMatch({}, {})


@dataclass(eq=False)
class PendingBlocks:
    """Blocks one assignment will store on a worker, until ``expires_at``."""

    worker_id: str
    hashes: tuple[int, ...]
    expires_at: float
    _slot: int = field(repr=False)
    _generation: int = field(repr=False)
    active: bool = True


class WorkerBlocks:
    """One worker's cached block hashes, as of ``sequence`` (None: no snapshot yet).

    The handle of one joined worker; ``hashes`` is read-only to callers. After ``leave`` (or
    a newer ``join`` of the same worker id) the handle is inert: updates are ignored, because
    they come from a stream that no longer speaks for the worker.
    """

    def __init__(self, index: PrefixIndex, worker_id: str, slot: int):
        self._index = index
        self.worker_id = worker_id
        self._slot = slot
        self._bit = 1 << slot
        self.sequence: int | None = None
        self.hashes: set[int] = set()
        self.active = True

    def reset(self, sequence: int, hashes: Iterable[int]) -> None:
        """A snapshot: the worker holds exactly ``hashes`` as of ``sequence``."""
        if not self.active:
            return
        new = set(hashes)
        self._drop(self.hashes - new)
        self._add(new - self.hashes)
        self.hashes = new
        self.sequence = sequence

    def store(self, sequence: int, hashes: Iterable[int]) -> bool:
        if not self._advance(sequence):
            return not self.active
        fresh = [h for h in hashes if h not in self.hashes]
        self.hashes.update(fresh)
        self._add(fresh)
        return True

    def remove(self, sequence: int, hashes: Iterable[int]) -> bool:
        if not self._advance(sequence):
            return not self.active
        gone = [h for h in hashes if h in self.hashes]
        self.hashes.difference_update(gone)
        self._drop(gone)
        return True

    def clear(self, sequence: int) -> bool:
        if not self._advance(sequence):
            return not self.active
        self._drop(self.hashes)
        self.hashes = set()
        return True

    def leave(self) -> None:
        """Purges the worker from the index (idempotent)."""
        if self.active:
            self._index._leave(self)

    def _advance(self, sequence: int) -> bool:
        """True when ``sequence`` is the next event; an inactive handle applies nothing."""
        if not self.active or self.sequence is None or sequence != self.sequence + 1:
            return False
        self.sequence = sequence
        return True

    def _add(self, hashes: Iterable[int]) -> None:
        cached, bit = self._index._cached, self._bit
        for h in hashes:
            cached[h] = cached.get(h, 0) | bit

    def _drop(self, hashes: Iterable[int]) -> None:
        cached, keep = self._index._cached, ~self._bit
        for h in hashes:
            mask = cached[h] & keep
            if mask:
                cached[h] = mask
            else:
                del cached[h]


class PrefixIndex:
    def __init__(self) -> None:
        self._cached: dict[int, int] = {}
        self._pending: dict[int, int] = {}
        self._workers: dict[str, WorkerBlocks] = {}
        self._slot_ids: list[str | None] = []
        self._free_slots: list[int] = []
        self._joined = 0  # bit mask of joined workers
        # Per slot: pending hash -> how many active assignments expect it there.
        self._pending_counts: list[dict[int, int]] = []
        self._generations: list[int] = []
        self._expiry: list[tuple[float, int, PendingBlocks]] = []
        self._tiebreak = itertools.count()

    # -- membership

    def join(self, worker_id: str) -> WorkerBlocks:
        """A handle for ``worker_id``'s stream; an earlier handle of that id is purged first."""
        old = self._workers.get(worker_id)
        if old is not None:
            old.leave()
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot = len(self._slot_ids)
            self._slot_ids.append(None)
            self._pending_counts.append({})
            self._generations.append(0)
        self._slot_ids[slot] = worker_id
        handle = WorkerBlocks(self, worker_id, slot)
        self._workers[worker_id] = handle
        self._joined |= 1 << slot
        return handle

    def _leave(self, handle: WorkerBlocks) -> None:
        slot, keep = handle._slot, ~handle._bit
        handle._drop(handle.hashes)
        handle.hashes = set()
        handle.active = False
        pending = self._pending
        for h in self._pending_counts[slot]:
            mask = pending[h] & keep
            if mask:
                pending[h] = mask
            else:
                del pending[h]
        self._pending_counts[slot] = {}
        self._generations[slot] += 1  # its pending entries still in the heap are void
        self._slot_ids[slot] = None
        self._joined &= keep
        del self._workers[handle.worker_id]
        heapq.heappush(self._free_slots, slot)

    def worker(self, worker_id: str) -> WorkerBlocks | None:
        return self._workers.get(worker_id)

    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    @property
    def num_hashes(self) -> int:
        """Distinct block hashes cached anywhere."""
        return len(self._cached)

    @property
    def num_entries(self) -> int:
        """(worker, block) pairs: the sum of every worker's cached blocks."""
        return sum(len(w.hashes) for w in self._workers.values())

    # -- matching

    def match(self, block_hashes: Sequence[int], now: float | None = None) -> PrefixMatch:
        """How many leading blocks of ``block_hashes`` each worker holds (cached or pending);
        ``now`` first expires pending assignments that are due."""
        if now is not None:
            self.expire(now)
        alive = self._joined
        if not alive or not block_hashes:
            return NO_MATCH
        cached, pending = self._cached, self._pending
        blocks: dict[str, int] = {}
        cached_blocks: dict[str, int] = {}
        cached_alive = alive
        depth = 0
        for h in block_hashes:
            mask = cached.get(h, 0)
            lost = cached_alive & ~mask
            if lost:
                self._record(cached_blocks, lost, depth)
                cached_alive &= mask
            if pending:
                mask |= pending.get(h, 0)
            lost = alive & ~mask
            if lost:
                self._record(blocks, lost, depth)
                alive &= mask
                if not alive:
                    break
            depth += 1
        else:
            self._record(cached_blocks, cached_alive, depth)
            self._record(blocks, alive, depth)
        return PrefixMatch(blocks, cached_blocks)

    def _record(self, out: dict[str, int], mask: int, depth: int) -> None:
        if not depth:
            return
        slot_ids = self._slot_ids
        while mask:
            low = mask & -mask
            out[slot_ids[low.bit_length() - 1]] = depth  # type: ignore[index]
            mask ^= low

    # -- pending assignments

    def add_pending(self, worker_id: str, hashes: Sequence[int],
                    expires_at: float) -> PendingBlocks | None:
        """Expects ``hashes`` on ``worker_id`` until ``expires_at`` (None: unknown worker)."""
        handle = self._workers.get(worker_id)
        if handle is None or not hashes:
            return None
        slot, bit = handle._slot, handle._bit
        counts, pending = self._pending_counts[slot], self._pending
        for h in hashes:
            n = counts.get(h)
            if n is None:
                counts[h] = 1
                pending[h] = pending.get(h, 0) | bit
            else:
                counts[h] = n + 1
        entry = PendingBlocks(worker_id, tuple(hashes), expires_at, slot,
                              self._generations[slot])
        heapq.heappush(self._expiry, (expires_at, next(self._tiebreak), entry))
        return entry

    def drop_pending(self, entry: PendingBlocks | None) -> None:
        """Withdraws an assignment's pending blocks now (idempotent)."""
        if entry is None or not entry.active:
            return
        entry.active = False
        if entry._generation != self._generations[entry._slot]:
            return  # the worker left; its pending blocks went with it
        counts, pending = self._pending_counts[entry._slot], self._pending
        keep = ~(1 << entry._slot)
        for h in entry.hashes:
            n = counts[h] - 1
            if n:
                counts[h] = n
                continue
            del counts[h]
            mask = pending[h] & keep
            if mask:
                pending[h] = mask
            else:
                del pending[h]

    def expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            self.drop_pending(heapq.heappop(expiry)[2])

    # -- checks

    def check_integrity(self) -> None:
        """Assert that the masks agree with every worker's set and pending counts."""
        for worker_id, handle in self._workers.items():
            assert self._slot_ids[handle._slot] == worker_id
            assert self._joined & handle._bit
            for h in handle.hashes:
                assert self._cached[h] & handle._bit, (worker_id, h)
            for h in self._pending_counts[handle._slot]:
                assert self._pending[h] & handle._bit, (worker_id, h)
        bits = sum(bin(mask).count("1") for mask in self._cached.values())
        assert bits == self.num_entries, (bits, self.num_entries)
        pending_bits = sum(bin(mask).count("1") for mask in self._pending.values())
        assert pending_bits == sum(len(c) for c in self._pending_counts)
        assert all(mask & ~self._joined == 0 for mask in self._cached.values())
