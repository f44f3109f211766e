"""KV events: what a worker tells routers about its prefix cache.

The block pool records every change to the set of cached block hashes as an event with a
sequence number (consecutive, starting at 1). A subscriber (the gRPC ``WatchState`` stream)
takes a ``snapshot()`` -- the cached set as of some sequence -- and then applies
``events_since(sequence)``; the result always equals the pool's cached set as of the last
event applied. The log keeps only a bounded ring of recent events (at most ``capacity`` events
carrying at most ``max_hashes`` hashes between them): a subscriber that falls further behind
gets ``SubscriberFellBehind`` and must take a new snapshot.

Threads: one writer (the engine thread, through the block pool) and any number of readers
(the asyncio side). One lock guards the sequence, the ring and the cached set, so a snapshot
is always consistent with the events up to its sequence. Readers wait without polling either
with ``wait(after, timeout)`` (a ``threading.Condition``) or with a listener callback that the
writer calls after each event, e.g. ``lambda: loop.call_soon_threadsafe(ready.set)``.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """These hashes are now cached (full blocks whose K/V is computed)."""

    sequence: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """These hashes are no longer cached (their blocks were evicted for reuse)."""

    sequence: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """Nothing is cached any more (the prefix cache was reset)."""

    sequence: int


KVEvent = BlocksStored | BlocksRemoved | AllCleared

_E = TypeVar("_E", BlocksStored, BlocksRemoved, AllCleared)

DEFAULT_CAPACITY = 65_536
# What a pool of N blocks passes as ``max_hashes``: a subscriber further behind than this many
# hashes would be sent more of them than a snapshot holds (at most N), so the ring keeps no
# more. Bounded by events alone, the ring grew a worker by ~20 MB over its first tens of
# thousands of requests (65,536 events of a few hashes each) before it levelled off.
HASHES_PER_BLOCK = 4


class SubscriberFellBehind(Exception):
    """The events after the subscriber's sequence are no longer kept: take a new snapshot."""

    def __init__(self, sequence: int, oldest_kept: int):
        super().__init__(f"events after {sequence} are gone (oldest kept: {oldest_kept})")
        self.sequence = sequence
        self.oldest_kept = oldest_kept


class KVEventLog:
    """Sequence-numbered KV events, the cached set they imply, and waiting for new ones.

    Invariant (under the lock): ``cached`` is the result of applying every event from 1 to
    ``sequence`` to the empty set, and the ring holds the events ``sequence - len(ring) + 1``
    .. ``sequence``.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_hashes: int | None = None):
        """Keeps the latest ``capacity`` events, fewer when they carry more than
        ``max_hashes`` hashes together (None: no such bound); the latest event is always kept."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_hashes is not None and max_hashes < 1:
            raise ValueError("max_hashes must be >= 1")
        self._cond = threading.Condition(threading.Lock())
        self._ring: deque[KVEvent] = deque(maxlen=capacity)
        self._max_hashes = max_hashes
        self._ring_hashes = 0   # hashes carried by the events in the ring
        self._sequence = 0
        self._cached: set[int] = set()
        self._listeners: list[Callable[[], None]] = []

    # -- writer side (the block pool, on the engine thread) ------------------------------

    def record_stored(self, block_hashes: Iterable[int]) -> BlocksStored:
        hashes = tuple(block_hashes)
        return self._record(lambda seq: BlocksStored(seq, hashes),
                            lambda: self._cached.update(hashes))

    def record_removed(self, block_hashes: Iterable[int]) -> BlocksRemoved:
        hashes = tuple(block_hashes)
        return self._record(lambda seq: BlocksRemoved(seq, hashes),
                            lambda: self._cached.difference_update(hashes))

    def record_cleared(self) -> AllCleared:
        return self._record(AllCleared, self._cached.clear)

    def _record(self, make: Callable[[int], _E], apply: Callable[[], object]) -> _E:
        with self._cond:
            self._sequence += 1
            event = make(self._sequence)
            apply()
            ring = self._ring
            if len(ring) == ring.maxlen:
                self._ring_hashes -= _num_hashes(ring[0])   # append() drops it
            ring.append(event)
            self._ring_hashes += _num_hashes(event)
            if self._max_hashes is not None:
                while self._ring_hashes > self._max_hashes and len(ring) > 1:
                    self._ring_hashes -= _num_hashes(ring.popleft())
            self._cond.notify_all()
            listeners = tuple(self._listeners)
        # Outside the lock: a listener may read the log (it must be quick and must not raise).
        for listener in listeners:
            listener()
        return event

    # -- reader side (any thread) --------------------------------------------------------

    @property
    def sequence(self) -> int:
        """Sequence number of the latest event (0: none yet)."""
        with self._cond:
            return self._sequence

    def snapshot(self) -> tuple[int, frozenset[int]]:
        """(sequence, cached hashes as of that sequence): the start of a subscription."""
        with self._cond:
            return self._sequence, frozenset(self._cached)

    def events_since(self, sequence: int) -> list[KVEvent]:
        """Events with sequence numbers > ``sequence``, oldest first ([] when up to date).

        Raises ``SubscriberFellBehind`` when some of them are no longer kept.
        """
        with self._cond:
            if not 0 <= sequence <= self._sequence:
                raise ValueError(f"sequence {sequence} is not in 0..{self._sequence}")
            oldest_kept = self._sequence - len(self._ring) + 1
            if sequence + 1 < oldest_kept:
                raise SubscriberFellBehind(sequence, oldest_kept)
            return list(itertools.islice(self._ring, sequence + 1 - oldest_kept, None))

    def wait(self, after: int, timeout: float | None = None) -> bool:
        """Block until an event later than ``after`` exists; False if ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sequence > after, timeout)

    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on the writer's thread after each new event.

        Returns a function that removes it; remove it before its event loop closes. The
        listener must be quick and must not raise (an exception reaches the engine thread).
        """
        with self._cond:
            self._listeners.append(listener)

        def remove() -> None:
            with self._cond:
                self._listeners.remove(listener)

        return remove


def _num_hashes(event: KVEvent) -> int:
    return 0 if isinstance(event, AllCleared) else len(event.block_hashes)
