"""KV cache manager: prefix hits, slot allocation, caching and freeing of requests' blocks
(workers/engine/kv_cache_manager.py)."""

from __future__ import annotations

import itertools

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

from workers.engine.kv_cache_manager import KVCacheManager
from workers.engine.kv_events import SubscriberFellBehind
from workers.engine.request import Request
from workers.engine.sampling_params import SamplingParams

BS = 4
_ids = itertools.count()


def make_request(tokens: list[int], cache_key: bytes = b"", max_tokens: int = 8) -> Request:
    rid = f"r{next(_ids)}"
    return Request(request_id=rid, parent_id=rid, prompt_token_ids=list(tokens),
                   sampling=SamplingParams(max_tokens=max_tokens), cache_key=cache_key,
                   block_size=BS)


def compute(kv: KVCacheManager, request: Request, num_new: int | None = None) -> None:
    """Admit (with prefix hit) or continue a request by num_new tokens (default: all), as
    the scheduler and one engine step would."""
    computed = []
    if not request.block_ids:
        computed, num_hit = kv.get_computed_blocks(request)
    else:
        num_hit = 0
    num_new = num_new or request.num_tokens - request.num_computed_tokens - num_hit
    assert kv.allocate_slots(request, num_new, computed)
    request.num_computed_tokens += num_hit + num_new
    kv.cache_blocks(request)


def test_identical_prefix_shares_cached_blocks_by_reference():
    kv = KVCacheManager(8, BS)
    first = make_request(list(range(10)))
    compute(kv, first)
    second = make_request(list(range(10)))
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8 and [b.block_id for b in blocks] == first.block_ids[:2]
    assert kv.allocate_slots(second, 2, blocks)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] != first.block_ids[2]
    assert [kv.pool.blocks[i].ref_count for i in first.block_ids] == [2, 2, 1]
    kv.check_integrity([first, second])


def test_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(8, BS)
    compute(kv, make_request(list(range(8))))
    again = make_request(list(range(8)))
    # Both blocks are cached, but the last token's logits are needed: its block is redone.
    blocks, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 4 and len(blocks) == 1
    longer = make_request(list(range(9)))
    blocks, num_hit = kv.get_computed_blocks(longer)
    assert num_hit == 8 and len(blocks) == 2
    assert kv.allocate_slots(longer, 1, blocks) and len(longer.block_ids) == 3


def test_different_cache_key_shares_nothing():
    kv = KVCacheManager(8, BS)
    compute(kv, make_request(list(range(12)), cache_key=b"tenant-a"))
    other_tenant = make_request(list(range(12)), cache_key=b"tenant-b")
    assert kv.get_computed_blocks(other_tenant) == ([], 0)
    assert kv.get_computed_blocks(make_request(list(range(12)), cache_key=b"tenant-a"))[1] == 8


def test_allocate_slots_that_do_not_fit_change_nothing():
    kv = KVCacheManager(3, BS)
    first = make_request(list(range(8)))
    compute(kv, first)
    kv.free(first)                        # 2 free cached blocks + 1 free plain block
    holder = make_request([9, 9])
    compute(kv, holder)                   # takes the plain block
    second = make_request(list(range(9)))
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8 and kv.num_free_blocks == 2
    # 2 free blocks, but reviving the 2 cached ones and adding a third needs 3.
    assert kv.allocate_slots(second, 1, blocks) is False
    assert second.block_ids == [] and kv.num_free_blocks == 2
    assert all(b.ref_count == 0 and b.block_hash is not None for b in blocks)
    kv.check_integrity([holder, second])


def test_cache_blocks_registers_only_full_computed_blocks():
    kv = KVCacheManager(8, BS)
    request = make_request(list(range(10)))
    compute(kv, request, 6)
    assert kv.pool.num_cached_blocks == 1
    compute(kv, request, 4)
    assert kv.pool.num_cached_blocks == 2     # the partial third block is not cacheable
    request.append_token(10)                  # decoding fills the third block
    compute(kv, request, 1)
    request.append_token(11)
    assert len(request.block_hashes) == 3
    assert kv.pool.num_cached_blocks == 2     # token 11 is appended but not computed yet
    compute(kv, request, 1)
    assert kv.pool.num_cached_blocks == 3
    kv.check_integrity([request])


def test_freed_request_keeps_its_prefix_cached_longest():
    kv = KVCacheManager(3, BS)
    request = make_request(list(range(12)))
    compute(kv, request)
    kv.free(request)
    assert request.block_ids == [] and kv.num_free_blocks == 3
    compute(kv, make_request([7, 7, 7]))      # evicts the request's last block only
    assert kv.get_computed_blocks(make_request(list(range(13))))[1] == 8


def test_caching_disabled_finds_no_prefix():
    kv = KVCacheManager(4, BS, enable_caching=False)
    compute(kv, make_request(list(range(8))))
    assert kv.get_computed_blocks(make_request(list(range(8)))) == ([], 0)
    assert kv.event_log.sequence == 0


PREFIXES = [[], [1, 2, 3, 0], [1, 2, 3, 0, 1, 1, 2, 2], [3] * 9]


class ManagerMachine(RuleBasedStateMachine):
    """Requests drawn from shared prefixes, computed in random chunks, decoded, freed."""

    def __init__(self):
        super().__init__()
        self.kv: KVCacheManager | None = None
        self.live: list[Request] = []

    @precondition(lambda self: self.kv is None)
    @rule(num_blocks=st.integers(2, 10), caching=st.booleans())
    def start(self, num_blocks, caching):
        self.kv = KVCacheManager(num_blocks, BS, caching, event_capacity=8)

    @precondition(lambda self: self.kv is not None)
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 3), max_size=6),
          key=st.sampled_from([b"", b"salt"]), chunk=st.integers(1, 8))
    def admit(self, prefix, suffix, key, chunk):
        request = make_request(prefix + suffix or [0], cache_key=key)
        blocks, num_hit = self.kv.get_computed_blocks(request)
        assert num_hit < request.num_tokens
        assert all(b.block_hash == h for b, h in zip(blocks, request.block_hashes))
        num_new = min(chunk, request.num_tokens - num_hit)
        free_before = self.kv.num_free_blocks
        if self.kv.allocate_slots(request, num_new, blocks):
            request.num_computed_tokens = num_hit + num_new
            self.kv.cache_blocks(request)
            self.live.append(request)
        else:
            assert request.block_ids == [] and self.kv.num_free_blocks == free_before

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 3))
    def step(self, data, chunk, token):
        request = data.draw(st.sampled_from(self.live))
        if request.num_computed_tokens == request.num_tokens:
            request.append_token(token)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        if self.kv.allocate_slots(request, num_new):
            request.num_computed_tokens += num_new
            self.kv.cache_blocks(request)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        request = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.kv.free(request)
        assert request.block_ids == []

    @precondition(lambda self: self.kv is not None)
    @rule()
    def reset_prefix_cache(self):
        assert self.kv.reset_prefix_cache() is (self.kv.num_used_blocks == 0)

    @invariant()
    def consistent(self):
        if self.kv is not None:
            self.kv.check_integrity(self.live)
            assert self.kv.num_used_blocks == len({b for r in self.live for b in r.block_ids})

    def teardown(self):
        if self.kv is not None:
            for request in self.live:
                self.kv.free(request)
            self.kv.check_integrity([])
            assert self.kv.num_free_blocks == self.kv.num_total_blocks


def test_kv_cache_manager_random_operations_keep_integrity():
    run_state_machine_as_test(
        ManagerMachine, settings=settings(max_examples=100, stateful_step_count=40, deadline=None))


def test_integrity_check_catches_a_leaked_block():
    kv = KVCacheManager(4, BS)
    request = make_request(list(range(6)))
    compute(kv, request)
    with pytest.raises(AssertionError):
        kv.check_integrity([])   # the request's blocks are referenced but nobody holds them


def test_the_event_log_keeps_no_more_hashes_than_a_few_snapshots_hold():
    """Requests that cycle the pool store and evict hashes for the worker's whole life: the
    ring of recent events must level off at a size set by the pool, not grow for 65,536
    events. A subscriber behind by more takes a snapshot (at most num_blocks hashes)."""
    kv = KVCacheManager(4, BS)
    log = kv.event_log
    subscriber_at = log.sequence
    for i in range(200):
        request = make_request([1000 * i + t for t in range(9)])
        compute(kv, request)
        kv.free(request)
    kv.check_integrity([])
    oldest = log.sequence - 1
    while oldest > 0:
        try:
            log.events_since(oldest - 1)
        except SubscriberFellBehind:
            break
        oldest -= 1
    kept = log.events_since(oldest)
    assert sum(len(e.block_hashes) for e in kept) <= 4 * kv.num_total_blocks
    assert kept[-1].sequence == log.sequence
    with pytest.raises(SubscriberFellBehind):
        log.events_since(subscriber_at)
