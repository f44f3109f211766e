"""Scheduler: budgets, chunked prefill, priorities, preemption, aborts, siblings and the
prefix cache, with the model simulated (workers/engine/scheduler.py)."""

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

from core.errors import ContextLengthExceeded
from workers.engine.kv_cache_manager import KVCacheManager
from workers.engine.outputs import FinishReason
from workers.engine.request import Request, RequestStatus
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

BS = 4
_ids = itertools.count()


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8,
                   threshold: int | None = None, caching: bool = True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             max_model_len=1024, long_prefill_token_threshold=threshold)
    return Scheduler(config, KVCacheManager(num_blocks, BS, caching, event_capacity=16))


def make_request(tokens: list[int], max_tokens: int = 4, priority: int = 0,
                 cache_key: bytes = b"", wait_for: Request | None = None) -> Request:
    rid = f"r{next(_ids)}"
    return Request(request_id=rid, parent_id=rid, prompt_token_ids=list(tokens),
                   sampling=SamplingParams(max_tokens=max_tokens), cache_key=cache_key,
                   block_size=BS, priority=priority, wait_for=wait_for)


def step(scheduler: Scheduler, token: int = 0) -> SchedulerOutput:
    """One engine step with a model that always samples ``token``; finishes at max length."""
    output = scheduler.schedule()
    for request in scheduler.update_after_step(output):
        request.append_token(token)
        if request.num_tokens >= request.max_total_tokens:
            scheduler.finish_request(request, FinishReason.LENGTH)
    scheduler.check_integrity()
    return output


def tokens_of(output: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in output.scheduled}


def test_second_identical_prompt_reuses_cached_blocks():
    scheduler = make_scheduler()
    first = make_request(list(range(10)), max_tokens=1)
    scheduler.add_request(first)
    step(scheduler)
    assert first.is_finished and first.num_cached_tokens == 0
    second = make_request(list(range(10)), max_tokens=1)
    scheduler.add_request(second)
    output = step(scheduler)
    assert second.num_cached_tokens == 8                 # two full blocks
    assert tokens_of(output) == {second.request_id: 2}   # computing only the rest
    assert output.scheduled[0].num_computed_tokens == 8


def test_chunked_prefill_respects_token_budget_beside_running_decodes():
    scheduler = make_scheduler(budget=16, threshold=12)
    decoders = [make_request([i, i], max_tokens=30) for i in range(3)]
    for request in decoders:
        scheduler.add_request(request)
    step(scheduler)
    long = make_request(list(range(100, 140)), max_tokens=1)
    scheduler.add_request(long)
    chunks = []
    while not long.is_finished:
        output = step(scheduler)
        assert output.num_batched_tokens <= 16
        assert [s.num_new_tokens for s in output.scheduled[:3]] == [1, 1, 1]  # decodes first
        assert output.num_decodes == 3
        chunks.append(tokens_of(output).get(long.request_id))
    assert chunks == [12, 12, 12, 4]   # chunk threshold 12 < 13 tokens left in the budget
    assert all(not d.is_finished and d.num_output_tokens == 5 for d in decoders)


def test_higher_priority_admitted_first():
    scheduler = make_scheduler(max_num_seqs=1)
    low = make_request([1])
    early, late = make_request([2], priority=5), make_request([3], priority=5)
    for request in (low, early, late):
        scheduler.add_request(request)
    assert [s.request for s in step(scheduler).scheduled] == [early]
    assert low.status is late.status is RequestStatus.WAITING
    order = []
    while scheduler.has_unfinished:
        order += [s.request for s in step(scheduler).scheduled if s.request not in order]
    assert order == [early, late, low]


def test_lower_priority_preempted_under_kv_pressure_and_recomputed():
    scheduler = make_scheduler(num_blocks=4, budget=8)
    low = make_request(list(range(12)), max_tokens=4)
    scheduler.add_request(low)
    while not low.num_output_tokens:
        step(scheduler, token=7)
    high = make_request(list(range(50, 58)), max_tokens=2, priority=1)
    scheduler.add_request(high)
    output = step(scheduler)
    # low's decode was scheduled first; preempting it gave its token back to the budget.
    assert output.preempted == [low] and tokens_of(output) == {high.request_id: 8}
    assert low.status is RequestStatus.WAITING and low.block_ids == []
    assert low.num_computed_tokens == 0 and low.num_preemptions == 1
    while not high.is_finished:
        assert low.request_id not in tokens_of(step(scheduler))   # it cannot jump `high`
    while not low.is_finished:
        step(scheduler, token=7)
    assert low.output_token_ids == [7, 7, 7, 7]   # the first token survived the recompute
    assert low.num_cached_tokens == 0             # as measured at first admission
    assert scheduler.kv_cache_manager.num_used_blocks == 0


def decoding(scheduler: Scheduler, count: int) -> list[Request]:
    """``count`` priority-0 requests, admitted and decoding (20 tokens each)."""
    requests = [make_request([i, i], max_tokens=20) for i in range(count)]
    for request in requests:
        scheduler.add_request(request)
    step(scheduler)
    return requests


def finish_all(scheduler: Scheduler, low: list[Request]) -> None:
    while scheduler.has_unfinished:
        step(scheduler)
    assert all(r.num_output_tokens == 20 for r in low)


def test_higher_priority_request_preempts_a_lower_one_from_a_full_batch():
    scheduler = make_scheduler(max_num_seqs=2)
    low = decoding(scheduler, 2)
    equal = make_request([9, 9], max_tokens=2)
    scheduler.add_request(equal)
    assert equal.request_id not in tokens_of(step(scheduler))  # equal priority waits
    high = make_request([5, 5], max_tokens=2, priority=1)
    scheduler.add_request(high)
    output = step(scheduler)
    assert high.request_id in tokens_of(output) and output.preempted == [low[1]]
    finish_all(scheduler, low)


def test_higher_priority_prefill_gets_a_step_without_lower_priority_decodes():
    scheduler = make_scheduler(max_num_seqs=4)
    low = decoding(scheduler, 2)
    high = make_request(list(range(30, 40)), max_tokens=2, priority=1)
    scheduler.add_request(high)
    assert tokens_of(step(scheduler)) == {high.request_id: 10}  # its prefill alone
    assert set(tokens_of(step(scheduler))) == {high.request_id, *(r.request_id for r in low)}
    finish_all(scheduler, low)


def test_lower_priority_request_does_not_jump_a_blocked_higher_priority_one():
    scheduler = make_scheduler(num_blocks=4)
    running = make_request(list(range(10)), max_tokens=2, priority=1)
    scheduler.add_request(running)
    step(scheduler)                                   # holds 3 of the 4 blocks
    blocked = make_request(list(range(20, 28)), priority=1)  # needs 2 blocks, equal priority
    small = make_request([5, 5], priority=0)          # would fit in the last block
    scheduler.add_request(blocked)
    scheduler.add_request(small)
    assert tokens_of(step(scheduler)) == {running.request_id: 1}
    assert running.is_finished
    assert set(tokens_of(step(scheduler))) == {blocked.request_id, small.request_id}


def test_preempted_request_is_not_jumped_by_a_later_arrival():
    scheduler = make_scheduler(num_blocks=4)
    first, second = make_request(list(range(8))), make_request(list(range(10, 18)))
    scheduler.add_request(first)
    scheduler.add_request(second)
    step(scheduler)                                   # 2 full blocks each
    late = make_request([1])
    scheduler.add_request(late)
    output = step(scheduler)                          # first needs a third block
    assert output.preempted == [second] and tokens_of(output) == {first.request_id: 1}
    # second sorts before late in the waiting queue and does not fit: late must not pass it.
    assert late.status is RequestStatus.WAITING
    while second.status is RequestStatus.WAITING:
        assert late.status is RequestStatus.WAITING
        step(scheduler)


def test_preempted_request_is_not_readmitted_in_the_same_step():
    scheduler = make_scheduler(num_blocks=4, budget=16, threshold=4, caching=False)
    high = make_request(list(range(8)), priority=1)
    low = make_request(list(range(10, 18)))
    scheduler.add_request(high)
    scheduler.add_request(low)
    step(scheduler)
    step(scheduler)                                   # 2 blocks each: the pool is full
    output = step(scheduler)                          # high needs a third block
    # low's first 4-token chunk would fit in a freed block, but it waits for the next step.
    assert output.preempted == [low] and tokens_of(output) == {high.request_id: 1}
    assert low.status is RequestStatus.WAITING
    assert tokens_of(step(scheduler)) == {high.request_id: 1, low.request_id: 4}


def test_abort_frees_blocks_at_once():
    scheduler = make_scheduler(num_blocks=4)
    kv = scheduler.kv_cache_manager
    running = make_request(list(range(12)))
    scheduler.add_request(running)
    step(scheduler)
    waiting = make_request([1, 2, 3], priority=-1)
    scheduler.add_request(waiting)
    assert scheduler.abort_request(waiting.request_id) is waiting
    assert waiting.finish_reason is FinishReason.ABORT and scheduler.num_waiting == 0

    high = make_request(list(range(40, 48)), priority=1)
    scheduler.add_request(high)
    assert step(scheduler).preempted == [running]
    used = kv.num_used_blocks
    assert scheduler.abort_request(running.request_id) is running   # aborted while preempted
    assert kv.num_used_blocks == used and scheduler.num_waiting == 0

    output = scheduler.schedule()
    assert scheduler.abort_request(high.request_id) is high   # aborted while running
    assert high.block_ids == [] and kv.num_used_blocks == 0
    assert scheduler.update_after_step(output) == []   # the step's result is dropped
    assert high.status is RequestStatus.FINISHED and high.finish_reason is FinishReason.ABORT
    assert scheduler.abort_request(high.request_id) is None and not scheduler.has_unfinished
    scheduler.check_integrity()


def test_sibling_waits_for_prompt_and_shares_its_blocks():
    scheduler = make_scheduler(budget=8)
    prompt = list(range(18))
    first = make_request(prompt, max_tokens=3)
    second = make_request(prompt, max_tokens=3, wait_for=first)
    scheduler.add_request(first)
    scheduler.add_request(second)
    for expected in (8, 8, 2):
        assert tokens_of(step(scheduler)) == {first.request_id: expected}
        assert second.status is RequestStatus.WAITING
    output = step(scheduler)
    assert tokens_of(output) == {first.request_id: 1, second.request_id: 2}
    assert second.num_cached_tokens == 16
    assert second.block_ids[:4] == first.block_ids[:4]


def test_sibling_of_an_aborted_request_computes_the_prompt_itself():
    scheduler = make_scheduler(budget=8)
    first = make_request(list(range(18)))
    second = make_request(list(range(18)), wait_for=first)
    scheduler.add_request(first)
    scheduler.add_request(second)
    step(scheduler)
    scheduler.abort_request(first.request_id)
    assert tokens_of(step(scheduler)) == {second.request_id: 8}


def test_request_longer_than_context_or_cache_is_refused():
    scheduler = make_scheduler(num_blocks=4)
    with pytest.raises(ContextLengthExceeded):
        scheduler.add_request(make_request(list(range(10)), max_tokens=7))   # 17 > 16 slots
    big = make_scheduler(num_blocks=1024)
    with pytest.raises(ContextLengthExceeded):
        big.add_request(make_request(list(range(1000)), max_tokens=100))    # > max_model_len
    assert not scheduler.has_unfinished and not big.has_unfinished


def test_load_reports_waiting_prefill_and_decode_room():
    scheduler = make_scheduler(max_num_seqs=1)
    a, b = make_request(list(range(10)), max_tokens=5), make_request(list(range(7)))
    scheduler.add_request(a)
    scheduler.add_request(b)
    assert scheduler.waiting_prefill_tokens == 17 and scheduler.num_waiting == 2
    step(scheduler)
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)
    assert scheduler.waiting_prefill_tokens == 7 and scheduler.running_decode_tokens == 4
    assert scheduler.get_request(a.request_id) is a


PREFIXES = [[], [1, 2, 3, 0], [1, 2, 3, 0, 1, 1, 2, 2], [3] * 9]


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds (shared prefixes, priorities, siblings), steps, aborts and cache resets
    under small pools; the model samples random tokens and stops at random."""

    def __init__(self):
        super().__init__()
        self.scheduler: Scheduler | None = None
        self.requests: list[Request] = []

    @precondition(lambda self: self.scheduler is None)
    @rule(num_blocks=st.integers(4, 12), budget=st.integers(4, 20), seqs=st.integers(1, 4),
          threshold=st.none() | st.integers(1, 8), caching=st.booleans())
    def start(self, num_blocks, budget, seqs, threshold, caching):
        self.scheduler = make_scheduler(num_blocks, budget, seqs, threshold, caching)

    @precondition(lambda self: self.scheduler is not None)
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 3), max_size=6),
          max_tokens=st.integers(1, 6), priority=st.integers(0, 2), n=st.integers(1, 2),
          key=st.sampled_from([b"", b"salt"]))
    def add(self, prefix, suffix, max_tokens, priority, n, key):
        prompt = prefix + suffix or [0]
        first = make_request(prompt, max_tokens, priority, key)
        capacity = self.scheduler.kv_cache_manager.num_total_blocks * BS
        if first.max_total_tokens > capacity:
            with pytest.raises(ContextLengthExceeded):
                self.scheduler.add_request(first)
            return
        siblings = [first] + [make_request(prompt, max_tokens, priority, key, wait_for=first)
                              for _ in range(n - 1)]
        for request in siblings:
            self.scheduler.add_request(request)
            self.requests.append(request)

    @precondition(lambda self: self.scheduler is not None)
    @rule(data=st.data())
    def step(self, data):
        scheduler, config = self.scheduler, self.scheduler.config
        had_work = scheduler.has_unfinished
        output = scheduler.schedule()
        assert not had_work or output.scheduled, "live requests but an empty step"
        assert output.num_batched_tokens == sum(s.num_new_tokens for s in output.scheduled)
        assert output.num_batched_tokens <= config.max_num_batched_tokens
        assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
        assert not {r.request_id for r in output.preempted} & set(tokens_of(output))
        sizes = [s.num_new_tokens for s in output.scheduled]
        assert sizes == sorted(sizes, key=lambda n: n > 1), "decodes first"
        for s in output.scheduled:
            assert s.request.status is RequestStatus.RUNNING
            assert 1 <= s.num_new_tokens <= config.max_chunk_tokens
            assert s.context_len <= s.request.num_tokens
            assert len(s.request.block_ids) * BS >= s.context_len
        scheduler.check_integrity()
        if output.scheduled and data.draw(st.booleans()):   # a client leaves mid-step
            scheduler.abort_request(data.draw(st.sampled_from(output.scheduled)).request.request_id)
        for request in scheduler.update_after_step(output):
            request.append_token(data.draw(st.integers(0, 3)))
            if request.num_tokens >= request.max_total_tokens:
                scheduler.finish_request(request, FinishReason.LENGTH)
            elif data.draw(st.integers(0, 4)) == 0:
                scheduler.finish_request(request, FinishReason.STOP)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def abort(self, data):
        request = data.draw(st.sampled_from(self.requests))
        was_live = not request.is_finished
        used = self.scheduler.kv_cache_manager.num_used_blocks
        assert (self.scheduler.abort_request(request.request_id) is request) == was_live
        assert request.is_finished and request.block_ids == []
        assert self.scheduler.kv_cache_manager.num_used_blocks <= used

    @precondition(lambda self: self.scheduler is not None)
    @rule()
    def reset_prefix_cache(self):
        kv = self.scheduler.kv_cache_manager
        assert kv.reset_prefix_cache() is (kv.num_used_blocks == 0)

    @invariant()
    def consistent(self):
        if self.scheduler is not None:
            self.scheduler.check_integrity()

    def teardown(self):
        if self.scheduler is None:
            return
        for _ in range(10_000):
            if not self.scheduler.has_unfinished:
                break
            step(self.scheduler)
        kv = self.scheduler.kv_cache_manager
        assert not self.scheduler.has_unfinished and kv.num_free_blocks == kv.num_total_blocks
        for request in self.requests:
            assert request.is_finished and request.block_ids == []
            assert request.num_output_tokens <= request.sampling.max_tokens
            if request.finish_reason is FinishReason.LENGTH:
                assert request.num_tokens == request.max_total_tokens


def test_scheduler_random_operations_keep_integrity():
    run_state_machine_as_test(
        SchedulerMachine, settings=settings(max_examples=150, stateful_step_count=40,
                                            deadline=None))
