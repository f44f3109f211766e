"""Continuous batching: which requests compute how many tokens in the next step.

There is no prefill or decode phase: each request's ``num_computed_tokens`` catches up with
its ``num_tokens``. A step gives running requests their share of the token budget first
(highest priority first; a decode needs one token), then admits waiting requests in priority
order with chunks of their prompts. When blocks run out, or the batch is full (``max_num_seqs``)
and a higher-priority request waits, the lowest-priority running request is preempted: its
blocks are freed and it is recomputed later (the prefix cache usually still holds most of
them). A waiting request that outranks every running one gets a step of its own (the lower
decodes resume in the next), so its first token does not wait on theirs. Requests are identified by ``request_id``, unique in the engine.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from core.errors import ContextLengthExceeded

from .kv_cache_manager import KVCacheManager
from .outputs import FinishReason
from .request import Request, RequestStatus

# Admission order, smallest first: higher priority, then earlier arrival, then earlier add.
_Key = tuple[int, float, int]


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int               # running requests at most
    max_num_batched_tokens: int     # new tokens per step, all requests together
    max_model_len: int              # context window: prompt + completion tokens
    # Most new tokens of one request in one step (prefill chunk); None: the step budget.
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be >= 1")

    @property
    def max_chunk_tokens(self) -> int:
        return min(self.long_prefill_token_threshold or self.max_num_batched_tokens,
                   self.max_num_batched_tokens)


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # Tokens already in the KV cache when the step starts (prefix hits, earlier chunks):
    # the new tokens sit at positions num_computed_tokens .. context_len - 1.
    num_computed_tokens: int

    @property
    def context_len(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    # Single-token requests ("decodes") first, then the multi-token ones.
    scheduled: list[ScheduledRequest]
    # Requests preempted by this step (none of them is in ``scheduled``): their blocks are
    # freed; they wait to be recomputed.
    preempted: list[Request]
    num_batched_tokens: int

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.num_new_tokens == 1)


@dataclass
class _Step:
    budget: int
    scheduled: dict[str, ScheduledRequest] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    """Holds every live request: RUNNING ones (holding blocks) and WAITING ones (holding none,
    in admission order). Finished requests are forgotten at once and hold no blocks."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self._requests: dict[str, Request] = {}
        self._keys: dict[str, _Key] = {}
        self._running: dict[str, Request] = {}
        self._waiting: list[tuple[_Key, Request]] = []   # sorted by key
        self._arrivals = itertools.count()

    # -- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (WAITING, holding no blocks)."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        if (request.status is not RequestStatus.WAITING or request.block_ids
                or request.num_computed_tokens):
            raise ValueError(f"request {request.request_id} is not new")
        if request.block_size != self.kv_cache_manager.block_size:
            raise ValueError(f"request block_size {request.block_size} differs from the cache's")
        if not request.prompt_token_ids:
            raise ValueError("the prompt must hold at least one token")
        if request.max_total_tokens <= request.num_prompt_tokens:
            raise ValueError("max_total_tokens leaves no room for a completion token")
        if request.max_total_tokens > self.config.max_model_len:
            raise ContextLengthExceeded(
                f"{request.max_total_tokens} tokens exceed the context window of "
                f"{self.config.max_model_len}", param="max_tokens")
        capacity = self.kv_cache_manager.num_total_blocks * self.kv_cache_manager.block_size
        if request.max_total_tokens > capacity:
            # It could never run to its end, even alone.
            raise ContextLengthExceeded(
                f"{request.max_total_tokens} tokens exceed this worker's KV cache of "
                f"{capacity} tokens", param="max_tokens")
        self._requests[request.request_id] = request
        self._keys[request.request_id] = (-request.priority, request.arrival_time,
                                          next(self._arrivals))
        self._push_waiting(request)

    def finish_request(self, request: Request, reason: FinishReason) -> None:
        """Mark it FINISHED, free its blocks at once and forget it (any state)."""
        if self._requests.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id} is not live in this scheduler")
        if self._running.pop(request.request_id, None) is None:
            self._remove_waiting(request)
        del self._requests[request.request_id]
        del self._keys[request.request_id]
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def abort_request(self, request_id: str) -> Request | None:
        """Finish it with ABORT from any state; None if no live request has this id."""
        request = self._requests.get(request_id)
        if request is not None:
            self.finish_request(request, FinishReason.ABORT)
        return request

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def queue_position(self, request_id: str) -> int | None:
        """How many waiting requests are ahead of this one; None when it is not waiting
        (running, finished, or not added yet)."""
        request = self._requests.get(request_id)
        key = self._keys.get(request_id)
        if request is None or key is None or request.status is not RequestStatus.WAITING:
            return None
        return bisect.bisect_left(self._waiting, (key,))

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose the next step's batch within the token budget and max_num_seqs."""
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step, self._urgent_priority())
        self._schedule_waiting(step)
        ordered = sorted(step.scheduled.values(), key=lambda s: s.num_new_tokens > 1)
        return SchedulerOutput(ordered, step.preempted,
                               sum(s.num_new_tokens for s in ordered))

    def update_after_step(self, output: SchedulerOutput) -> list[Request]:
        """Advance the scheduled requests by the tokens just computed and cache their newly
        full blocks. Returns those that caught up (all tokens computed): each gets a sampled
        token, which the engine appends (``append_token``) before finishing it or not."""
        caught_up: list[Request] = []
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.is_finished:
                continue   # aborted after schedule(): its blocks are already freed
            if request.num_computed_tokens != scheduled.num_computed_tokens:
                raise ValueError(f"request {request.request_id}: step applied twice")
            request.num_computed_tokens += scheduled.num_new_tokens
            self.kv_cache_manager.cache_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                caught_up.append(request)
        return caught_up

    def _urgent_priority(self) -> int | None:
        """The priority of the first waiting request if it outranks every running one: its
        prefill then gets a step without the lower-priority decodes (they resume next step),
        so a higher plan's first token does not pay for a batch of lower-plan decodes."""
        if not self._waiting:
            return None
        head = self._waiting[0][1]
        if head.wait_for is not None:
            return None
        top_running = max((r.priority for r in self._running.values()), default=None)
        if top_running is None or head.priority <= top_running:
            return None
        return head.priority

    def _schedule_running(self, step: _Step, urgent: int | None = None) -> None:
        for request in sorted(self._running.values(), key=self._key):
            if step.budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue   # preempted earlier in this loop
            if urgent is not None and request.priority < urgent:
                break      # sorted by priority: the rest are lower too
            num_new = min(request.num_uncomputed_tokens, step.budget,
                          self.config.max_chunk_tokens)
            if num_new == 0:
                continue
            while not self.kv_cache_manager.allocate_slots(request, num_new):
                # The lowest-priority running request sorts at or after this one.
                victim = max(self._running.values(), key=self._key)
                self._preempt(victim, step)
                if victim is request:
                    break
            else:   # no break: the slots fit
                self._add_scheduled(step, request, num_new)

    def _schedule_waiting(self, step: _Step) -> None:
        for _, request in list(self._waiting):
            if step.budget == 0:
                return
            if len(self._running) >= self.config.max_num_seqs and \
                    not self._make_room(request, step):
                return
            if request in step.preempted:
                # It would only retake the blocks it just gave up; nothing behind it may
                # pass it either.
                return
            if self._waits_for_sibling(request):
                continue   # stays queued; it will share the sibling's prompt blocks
            if not self._admit(request, step):
                return     # a lower-priority request must not jump a blocked one

    def _make_room(self, request: Request, step: _Step) -> bool:
        """A full batch takes a waiting request only by preempting its lowest-priority
        running one, and only if that is strictly lower: a higher plan's request never waits
        for a batch of lower-priority decodes to finish."""
        victim = max(self._running.values(), key=self._key, default=None)
        if victim is None or victim.priority >= request.priority:
            return False
        self._preempt(victim, step)
        return True

    def _admit(self, request: Request, step: _Step) -> bool:
        """Admit a waiting request, preempting strictly lower-priority running ones if its
        first chunk does not fit. False (nothing changed for it) if it still cannot fit."""
        while True:
            computed, num_hit = self.kv_cache_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, step.budget,
                          self.config.max_chunk_tokens)
            if self.kv_cache_manager.allocate_slots(request, num_new, computed):
                break
            victim = max(self._running.values(), key=self._key, default=None)
            if victim is None or victim.priority >= request.priority:
                return False
            self._preempt(victim, step)
        self._remove_waiting(request)
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_hit
        request.num_computed_tokens = num_hit
        request.status = RequestStatus.RUNNING
        self._running[request.request_id] = request
        self._add_scheduled(step, request, num_new)
        return True

    def _preempt(self, request: Request, step: _Step) -> None:
        """Free its blocks and queue it to be recomputed from scratch."""
        del self._running[request.request_id]
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self._push_waiting(request)
        unscheduled = step.scheduled.pop(request.request_id, None)
        if unscheduled is not None:
            step.budget += unscheduled.num_new_tokens
        step.preempted.append(request)

    @staticmethod
    def _add_scheduled(step: _Step, request: Request, num_new: int) -> None:
        step.scheduled[request.request_id] = ScheduledRequest(
            request, num_new, request.num_computed_tokens)
        step.budget -= num_new

    @staticmethod
    def _waits_for_sibling(request: Request) -> bool:
        sibling = request.wait_for
        return (sibling is not None and not sibling.is_finished
                and sibling.num_computed_tokens < sibling.num_prompt_tokens)

    def _key(self, request: Request) -> _Key:
        return self._keys[request.request_id]

    def _push_waiting(self, request: Request) -> None:
        # Keys are unique, so tuples never compare the Request objects themselves.
        bisect.insort(self._waiting, (self._key(request), request))

    def _remove_waiting(self, request: Request) -> None:
        i = bisect.bisect_left(self._waiting, (self._key(request),))
        if i == len(self._waiting) or self._waiting[i][1] is not request:
            raise ValueError(f"request {request.request_id} is not waiting")
        del self._waiting[i]

    # -- load and checks -----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def waiting_prefill_tokens(self) -> int:
        """Tokens the waiting requests (new or preempted) still have to compute."""
        return sum(request.num_uncomputed_tokens for _, request in self._waiting)

    @property
    def running_decode_tokens(self) -> int:
        """Tokens the running requests may still generate, at most."""
        return sum(max(0, r.max_total_tokens - r.num_tokens) for r in self._running.values())

    def check_integrity(self) -> None:
        """Assert that queues, statuses and block references agree."""
        waiting = [request for _, request in self._waiting]
        keys = [key for key, _ in self._waiting]
        assert keys == sorted(set(keys)), "waiting queue out of order or duplicated"
        assert all(self._keys[r.request_id] == key for key, r in self._waiting)
        waiting_ids = {r.request_id for r in waiting}
        assert not waiting_ids & self._running.keys(), "a request both running and waiting"
        assert waiting_ids | self._running.keys() == self._requests.keys() == self._keys.keys()
        assert len(self._running) <= self.config.max_num_seqs
        for request in self._running.values():
            assert request.status is RequestStatus.RUNNING, request.request_id
        for request in waiting:
            assert request.status is RequestStatus.WAITING, request.request_id
            assert not request.block_ids and request.num_computed_tokens == 0, \
                f"waiting request {request.request_id} holds blocks"
        self.kv_cache_manager.check_integrity(self._requests.values())
