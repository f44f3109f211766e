"""Block pool, prefix-cache eviction order and KV events (workers/engine/block_pool.py,
workers/engine/kv_events.py)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from workers.engine.block_pool import BlockPool, KVBlock
from workers.engine.kv_events import (
    AllCleared,
    BlocksRemoved,
    BlocksStored,
    KVEventLog,
    SubscriberFellBehind,
)


class Subscriber:
    """What a router does with a worker's state stream: snapshot, then deltas; resync on gaps."""

    def __init__(self, log: KVEventLog):
        self.log = log
        self.resyncs = 0
        self.resync()

    def resync(self) -> None:
        self.sequence, hashes = self.log.snapshot()
        self.cached = set(hashes)
        self.resyncs += 1

    def poll(self) -> None:
        try:
            events = self.log.events_since(self.sequence)
        except SubscriberFellBehind:
            self.resync()
            return
        for event in events:
            assert event.sequence == self.sequence + 1, "sequence numbers are consecutive"
            if isinstance(event, BlocksStored):
                assert not self.cached & set(event.block_hashes), "stored twice"
                self.cached.update(event.block_hashes)
            elif isinstance(event, BlocksRemoved):
                assert set(event.block_hashes) <= self.cached, "removed what was not stored"
                self.cached.difference_update(event.block_hashes)
            else:
                assert isinstance(event, AllCleared)
                self.cached.clear()
            self.sequence = event.sequence


def cached_set(pool: BlockPool) -> set[int]:
    return {b.block_hash for b in pool.blocks if b.block_hash is not None}


def make_pool(num_blocks: int, capacity: int = 65_536, caching: bool = True) -> BlockPool:
    return BlockPool(num_blocks, 4, caching, KVEventLog(capacity))


def held_with_hashes(pool: BlockPool, hashes: list[int]) -> list[KVBlock]:
    blocks = pool.allocate(len(hashes))
    pool.cache_full_blocks(blocks, hashes)
    return blocks


def test_lru_evicts_least_recently_freed_unreferenced_block_first():
    pool = make_pool(4)
    a, b, c, d = (held_with_hashes(pool, [h])[0] for h in (1, 2, 3, 4))
    for block in (c, a, d, b):
        pool.free([block])
    # A cache hit takes c out of the free queue; freed again, it is the most recently freed.
    assert pool.get_cached_block(3) is c
    pool.touch([c])
    pool.free([c])

    assert pool.allocate(1) == [a]
    assert pool.get_cached_block(1) is None and a.block_hash is None
    assert pool.allocate(1) == [d]
    assert pool.allocate(1) == [b]
    assert pool.get_cached_block(3) is c   # the most recently freed survives longest
    pool.check_integrity()


def test_request_freed_tail_first_loses_its_last_block_before_its_prefix():
    pool = make_pool(3)
    blocks = held_with_hashes(pool, [10, 11, 12])
    pool.free(reversed(blocks))
    assert [b.block_hash for b in pool.allocate(1)] == [None]
    assert pool.get_cached_block(12) is None
    assert pool.get_cached_block(10) is blocks[0] and pool.get_cached_block(11) is blocks[1]


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = make_pool(3)
    cached = held_with_hashes(pool, [7])
    plain = pool.allocate(2)
    pool.free(cached)
    pool.free(plain)
    assert set(pool.allocate(2)) == set(plain)
    assert pool.get_cached_block(7) is cached[0]


def test_hash_cached_by_another_block_is_not_registered_twice():
    log = KVEventLog()
    pool = BlockPool(2, 4, True, log)
    first, second = pool.allocate(2)
    pool.cache_full_blocks([first], [5])
    pool.cache_full_blocks([second], [5])
    assert pool.get_cached_block(5) is first and second.block_hash is None
    assert log.events_since(0) == [BlocksStored(1, (5,))]
    pool.check_integrity()


def test_allocate_evicts_cached_blocks_and_reports_them_in_one_event():
    log = KVEventLog()
    pool = BlockPool(3, 4, True, log)
    pool.free(reversed(held_with_hashes(pool, [1, 2, 3])))
    pool.allocate(3)
    assert log.events_since(1) == [BlocksRemoved(2, (3, 2, 1))]
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 0


def test_reset_prefix_cache_refused_while_a_block_is_referenced():
    log = KVEventLog()
    pool = BlockPool(2, 4, True, log)
    held = held_with_hashes(pool, [1, 2])
    pool.free(held[1:])
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(2) is held[1]
    pool.free(held[:1])
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0 and isinstance(log.events_since(1)[-1], AllCleared)
    pool.check_integrity()


def test_caching_disabled_caches_nothing_and_emits_nothing():
    log = KVEventLog()
    pool = BlockPool(2, 4, False, log)
    pool.free(held_with_hashes(pool, [1, 2]))
    assert pool.num_cached_blocks == 0 and log.sequence == 0
    pool.check_integrity()


def test_kv_events_snapshot_then_deltas_reconstruct_cached_set():
    log = KVEventLog()
    pool = BlockPool(4, 4, True, log)
    early = Subscriber(log)
    a = held_with_hashes(pool, [1, 2])
    late = Subscriber(log)   # joins after events: its snapshot already holds 1 and 2
    pool.free(reversed(a))
    b = held_with_hashes(pool, [3, 4, 5])   # evicts one of a's blocks
    early.poll()
    late.poll()
    assert early.cached == late.cached == cached_set(pool) == {1, 3, 4, 5}
    pool.free(b)
    pool.reset_prefix_cache()
    held_with_hashes(pool, [6])
    for subscriber in (early, late, Subscriber(log)):
        subscriber.poll()
        assert subscriber.cached == cached_set(pool) == {6}
        assert subscriber.sequence == log.sequence
    assert early.resyncs == 1 and late.resyncs == 1


def test_subscriber_falling_behind_sees_a_gap():
    log = KVEventLog(capacity=4)
    pool = BlockPool(8, 4, True, log)
    subscriber = Subscriber(log)
    for h in range(6):
        held_with_hashes(pool, [h])
    assert log.events_since(2) == [BlocksStored(s, (s - 1,)) for s in range(3, 7)]
    with pytest.raises(SubscriberFellBehind):
        log.events_since(subscriber.sequence)
    subscriber.poll()   # resyncs from a new snapshot
    assert subscriber.resyncs == 2 and subscriber.cached == cached_set(pool)
    assert log.events_since(log.sequence) == []
    with pytest.raises(ValueError):
        log.events_since(log.sequence + 1)


def test_reader_waiting_on_another_thread_wakes_on_new_event():
    log = KVEventLog()
    woke: list[bool] = []
    calls: list[int] = []
    remove = log.add_listener(lambda: calls.append(log.sequence))
    started = threading.Event()

    def reader() -> None:
        started.set()
        woke.append(log.wait(after=0, timeout=30))

    thread = threading.Thread(target=reader)
    thread.start()
    started.wait()
    log.record_stored([1])
    thread.join()
    assert woke == [True] and calls == [1]
    assert log.wait(after=1, timeout=0) is False
    remove()
    log.record_removed([1])
    assert calls == [1]


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / cache / hit / free / reset against a model of the free queue."""

    def __init__(self):
        super().__init__()
        self.pool: BlockPool | None = None

    @precondition(lambda self: self.pool is None)
    @rule(num_blocks=st.integers(1, 8), capacity=st.integers(1, 6), caching=st.booleans())
    def start(self, num_blocks, capacity, caching):
        self.pool = BlockPool(num_blocks, 4, caching, KVEventLog(capacity))
        self.owners: list[list[KVBlock]] = []
        self.free_order = list(range(num_blocks))   # model: eviction order, front first
        self.subscribers = [Subscriber(self.pool.event_log)]

    def _release(self, blocks) -> None:
        for block in blocks:
            if block.ref_count == 1:
                if block.block_hash is None:
                    self.free_order.insert(0, block.block_id)
                else:
                    self.free_order.append(block.block_id)
        self.pool.free(blocks)

    @precondition(lambda self: self.pool is not None)
    @rule(n=st.integers(1, 4))
    def allocate(self, n):
        if n > self.pool.num_free_blocks:
            with pytest.raises(ValueError):
                self.pool.allocate(n)
            return
        blocks = self.pool.allocate(n)
        assert [b.block_id for b in blocks] == self.free_order[:n]
        del self.free_order[:n]
        assert all(b.ref_count == 1 and b.block_hash is None for b in blocks)
        self.owners.append(blocks)

    @precondition(lambda self: self.pool is not None and self.owners)
    @rule(data=st.data())
    def cache(self, data):
        blocks = data.draw(st.sampled_from(self.owners))
        fresh = [b for b in blocks if b.block_hash is None]
        hashes = data.draw(st.lists(st.integers(0, 11), min_size=len(fresh), max_size=len(fresh)))
        before = cached_set(self.pool)
        self.pool.cache_full_blocks(fresh, hashes)
        if self.pool.enable_caching:
            assert cached_set(self.pool) == before | set(hashes)

    @precondition(lambda self: self.pool is not None)
    @rule(block_hash=st.integers(0, 11))
    def hit(self, block_hash):
        block = self.pool.get_cached_block(block_hash)
        if block is not None:
            assert block.block_hash == block_hash
            if block.ref_count == 0:
                self.free_order.remove(block.block_id)
            self.pool.touch([block])
            self.owners.append([block])

    @precondition(lambda self: self.pool is not None and self.owners)
    @rule(data=st.data())
    def free(self, data):
        blocks = self.owners.pop(data.draw(st.integers(0, len(self.owners) - 1)))
        self._release(list(reversed(blocks)))

    @precondition(lambda self: self.pool is not None)
    @rule()
    def reset(self):
        assert self.pool.reset_prefix_cache() is (not self.owners)
        if not self.owners:
            assert cached_set(self.pool) == set()

    @precondition(lambda self: self.pool is not None)
    @rule()
    def subscribe(self):
        self.subscribers.append(Subscriber(self.pool.event_log))

    @invariant()
    def consistent(self):
        if self.pool is None:
            return
        self.pool.check_integrity()
        assert self.pool.num_free_blocks == len(self.free_order)
        for subscriber in self.subscribers:
            subscriber.poll()
            assert subscriber.cached == cached_set(self.pool)

    def teardown(self):
        if self.pool is not None:
            while self.owners:
                self._release(list(reversed(self.owners.pop())))
            self.pool.check_integrity()
            assert self.pool.num_free_blocks == self.pool.num_blocks


def test_block_pool_random_operations_keep_integrity():
    run_state_machine_as_test(
        PoolMachine, settings=settings(max_examples=100, stateful_step_count=40, deadline=None))


def test_the_ring_drops_its_oldest_events_past_max_hashes_but_keeps_the_latest():
    log = KVEventLog(capacity=100, max_hashes=5)
    log.record_stored([1, 2])
    log.record_stored([3, 4])
    log.record_removed([1])                       # 5 hashes: all three kept
    assert [e.sequence for e in log.events_since(0)] == [1, 2, 3]
    log.record_cleared()                          # carries none
    log.record_stored([5, 6])                     # 7: the first event goes
    with pytest.raises(SubscriberFellBehind):
        log.events_since(0)
    assert [e.sequence for e in log.events_since(1)] == [2, 3, 4, 5]
    log.record_stored(list(range(10, 20)))        # more than max_hashes alone: kept alone
    assert log.events_since(5) == [BlocksStored(6, tuple(range(10, 20)))]
    with pytest.raises(SubscriberFellBehind):
        log.events_since(4)
    assert log.snapshot() == (6, frozenset([5, 6, *range(10, 20)]))
