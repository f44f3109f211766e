"""One simulated worker, and the ``WorkerView`` through which the router's policies see it.

The worker's KV cache is the engine's own ``BlockPool`` (workers/engine/block_pool.py) with
its ``KVEventLog``: lookups, LRU eviction of unreferenced blocks, and the stored / removed
events the router's prefix index consumes, exactly as a real worker produces them. Only the
clock is simulated. Its scheduler mirrors the engine's: each step runs every decoding
sequence (one token each) and fills the rest of the token budget with prefill chunks,
running prefills first, then waiting requests in arrival order (a waiting request is
admitted when it gets its first chunk and its blocks fit); a step's time comes from the
``ServiceModel``.

What the router learns, and when (``SimView``):
- KV events reach the prefix index ``event_delay_s`` after the pool recorded them;
- the load is the worker's state at its last report tick (every ``load_interval_s``, at a
  per-worker phase), seen ``load_delay_s`` later -- as the WatchState stream sends it;
- ``in_flight`` / ``in_flight_tokens`` are the router's own ``LocalLoad`` counts, exact.

Decode-only stretches are simulated in one event (their step time is constant until a
sequence finishes or a request arrives); an arrival cuts the stretch at the end of the step
in progress, where the engine would admit it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bench.sim.service import ServiceModel, chunk_context_weight
from bench.sim.trace import TraceRequest
from router.routing.load import Assignment, CountsLocalLoad, LocalLoad, WorkerLoad
from router.routing.prefix_index import WorkerBlocks
from workers.engine.block_pool import BlockPool, KVBlock
from workers.engine.kv_events import BlocksRemoved, BlocksStored, KVEventLog


class Job:
    """One request on its worker."""

    __slots__ = ("request", "assignment", "hashes", "cacheable", "blocks", "hit_blocks",
                 "computed", "registered", "first_token_s")

    def __init__(self, request: TraceRequest, assignment: Assignment, block_size: int):
        self.request = request
        self.assignment = assignment
        self.hashes = request.block_hashes
        # A partial last block is never cached (as in the engine).
        self.cacheable = min(len(self.hashes), request.input_length // block_size)
        self.blocks: list[KVBlock] = []
        self.hit_blocks = 0
        self.computed = 0      # prompt tokens in the cache (hits + prefilled chunks)
        self.registered = 0    # leading blocks registered in the prefix cache
        self.first_token_s: float | None = None

    @property
    def remaining(self) -> int:
        return self.request.input_length - self.computed


@dataclass(frozen=True)
class Delays:
    event_delay_s: float = 0.1
    load_interval_s: float = 0.1
    load_delay_s: float = 0.01


class SimWorker:
    def __init__(self, worker_id: str, *, num_blocks: int, block_size: int,
                 service: ServiceModel, rng: random.Random, handle: WorkerBlocks,
                 delays: Delays, schedule: Callable[[float, int, object, int], None],
                 on_first_token: Callable[[Job, float], None],
                 on_finish: Callable[[Job, float], None]):
        self.worker_id = worker_id
        self.block_size = block_size
        self.service = service
        self.rng = rng
        self.log = KVEventLog()
        self.pool = BlockPool(num_blocks, block_size, enable_caching=True, event_log=self.log)
        self.handle = handle
        handle.reset(0, ())
        self.delays = delays
        self._schedule = schedule  # (time, kind, worker, payload)
        self._on_first_token = on_first_token
        self._on_finish = on_finish
        self.waiting: deque[Job] = deque()
        self.waiting_tokens = 0
        self.prefilling: deque[Job] = deque()  # admitted, prompt not fully computed, FCFS
        self.decoding: list[tuple[int, int, Job]] = []  # (finish step, tiebreak, job)
        self.decode_context = 0
        self.steps = 0
        self.version = 0  # bumps void a scheduled step end
        self._chunks: list[tuple[Job, int]] = []
        self._stretch: tuple[float, float, int] | None = None  # (start, step s, steps)
        self._busy = False
        self._announced = 0  # last event sequence scheduled for delivery
        self._tiebreak = 0
        self.prefill_tokens = 0
        self.history: deque[tuple[float, WorkerLoad]] = deque(
            [(-math.inf, WorkerLoad(kv_blocks_total=num_blocks))])

    # -- what the simulation calls

    def enqueue(self, job: Job, now: float) -> None:
        need = -(-(job.request.input_length + job.request.output_length) // self.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"request {job.request.index} needs {need} blocks; the worker's "
                             f"cache has {self.pool.num_blocks}")
        self.waiting.append(job)
        self.waiting_tokens += job.request.input_length
        if not self._busy:
            self._plan(now)
        elif self._stretch is not None:
            self._cut_stretch(now)
        self._record(now)

    def step_end(self, now: float, version: int) -> None:
        if version != self.version:
            return  # rescheduled
        self._busy = False
        if self._stretch is not None:
            self.steps += self._stretch[2]
            self._stretch = None
        else:
            self.steps += 1
            self._finish_chunks(now)
        decoding = self.decoding
        while decoding and decoding[0][0] <= self.steps:
            self._finish(heapq.heappop(decoding)[2], now)
        self._plan(now)
        self._record(now)

    def deliver(self, upto: int) -> None:
        """Applies the KV events up to sequence ``upto`` to the router's prefix index."""
        handle = self.handle
        assert handle.sequence is not None
        for event in self.log.events_since(handle.sequence):
            if event.sequence > upto:
                break
            if isinstance(event, BlocksStored):
                ok = handle.store(event.sequence, event.block_hashes)
            elif isinstance(event, BlocksRemoved):
                ok = handle.remove(event.sequence, event.block_hashes)
            else:
                ok = handle.clear(event.sequence)
            assert ok, "KV events out of order"

    # -- the step loop

    def _plan(self, now: float) -> None:
        """Starts the next step, if there is work."""
        budget = self.service.max_batch_tokens - len(self.decoding)
        chunks: list[tuple[Job, int]] = []
        for job in self.prefilling:
            if budget <= 0:
                break
            n = min(job.remaining, budget)
            chunks.append((job, n))
            budget -= n
        running = len(self.prefilling) + len(self.decoding)
        while budget > 0 and self.waiting and running < self.service.max_num_seqs:
            job = self.waiting[0]
            if not self._admit(job):
                break  # its blocks do not fit: it waits for a request to finish
            self.waiting.popleft()
            self.waiting_tokens -= job.request.input_length
            self.prefilling.append(job)
            running += 1
            n = min(job.remaining, budget)
            chunks.append((job, n))
            budget -= n
        self._announce(now)
        if chunks:
            tokens = sum(n for _, n in chunks)
            weight = sum(chunk_context_weight(job.computed, n) for job, n in chunks)
            dt = self.service.step_s(tokens, weight, len(self.decoding), self.decode_context,
                                     self.rng)
            self._chunks = chunks
            self._start(now, dt)
        elif self.decoding:
            steps = self.decoding[0][0] - self.steps
            dt = self.service.step_s(0, 0.0, len(self.decoding), self.decode_context, self.rng)
            self._stretch = (now, dt, steps)
            self._start(now, dt * steps)

    def _start(self, now: float, duration: float) -> None:
        self._busy = True
        self.version += 1
        self._schedule(now + duration, 0, self, self.version)

    def _cut_stretch(self, now: float) -> None:
        """An arrival during a decode-only stretch: it ends with the step in progress."""
        assert self._stretch is not None
        start, dt, steps = self._stretch
        done = int((now - start) / dt) + 1
        if done < steps:
            self._stretch = (start, dt, done)
            self.version += 1
            self._schedule(start + dt * done, 0, self, self.version)

    def _admit(self, job: Job) -> bool:
        """Takes its cached leading blocks and fresh blocks for the rest of its tokens."""
        request, pool = job.request, self.pool
        limit = (request.input_length - 1) // self.block_size  # the last token is recomputed
        hits: list[KVBlock] = []
        for h in job.hashes[:limit]:
            block = pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        total = -(-(request.input_length + request.output_length) // self.block_size)
        revived = sum(1 for b in hits if b.ref_count == 0)
        if total - len(hits) + revived > pool.num_free_blocks:
            return False
        pool.touch(hits)
        job.blocks = hits + pool.allocate(total - len(hits))
        job.hit_blocks = job.registered = len(hits)
        job.computed = len(hits) * self.block_size
        return True

    def _finish_chunks(self, now: float) -> None:
        for job, n in self._chunks:
            job.computed += n
            self.prefill_tokens += n
            full = min(job.computed // self.block_size, job.cacheable)
            if full > job.registered:
                self.pool.cache_full_blocks(job.blocks[job.registered:full],
                                            job.hashes[job.registered:full])
                job.registered = full
        self._chunks = []
        prefilling = self.prefilling
        while prefilling and prefilling[0].remaining == 0:
            job = prefilling.popleft()
            job.first_token_s = now
            self._on_first_token(job, now)
            if job.request.output_length <= 1:
                self._finish(job, now)
                continue
            self._tiebreak += 1
            heapq.heappush(self.decoding, (self.steps + job.request.output_length - 1,
                                           self._tiebreak, job))
            self.decode_context += self._context(job)

    def _finish(self, job: Job, now: float) -> None:
        if job.first_token_s is not None and job.request.output_length > 1:
            self.decode_context -= self._context(job)
        self.pool.free(reversed(job.blocks))  # tail first, as the engine frees
        job.blocks = []
        self._on_finish(job, now)

    @staticmethod
    def _context(job: Job) -> int:
        """A decoding sequence's mean context over its decode (the KV its steps read)."""
        return job.request.input_length + job.request.output_length // 2

    def _announce(self, now: float) -> None:
        """Schedules the delivery of the events recorded since the last announcement."""
        sequence = self.log.sequence
        if sequence > self._announced:
            self._announced = sequence
            self._schedule(now + self.delays.event_delay_s, 1, self, sequence)

    def _record(self, now: float) -> None:
        self._announce(now)
        history = self.history
        # A view reads the state at most one report interval and its delay back.
        horizon = now - self.delays.load_delay_s - self.delays.load_interval_s
        while len(history) > 1 and history[1][0] <= horizon:
            history.popleft()
        running = len(self.prefilling) + len(self.decoding)
        remaining = sum(step - self.steps for step, _, _ in self.decoding)
        history.append((now, WorkerLoad(
            running=running, waiting=len(self.waiting), waiting_prefill_tokens=self.waiting_tokens,
            kv_blocks_used=self.pool.num_blocks - self.pool.num_free_blocks,
            kv_blocks_total=self.pool.num_blocks, running_decode_tokens=remaining)))


class SimView(CountsLocalLoad):
    """A ``WorkerView`` of a ``SimWorker``: its reported load, lagging, and the router's own
    count of its requests."""

    __slots__ = ("worker_id", "worker", "local", "_clock", "_interval", "_phase", "_delay")

    def __init__(self, worker: SimWorker, clock: Callable[[], float], delays: Delays,
                 phase: float):
        self.worker_id = worker.worker_id
        self.worker = worker
        self.local = LocalLoad()
        self._clock = clock
        self._interval = delays.load_interval_s
        self._phase = phase
        self._delay = delays.load_delay_s

    @property
    def load(self) -> WorkerLoad:
        """The worker's state at its last report tick that has reached the router."""
        seen = self._clock() - self._delay
        if self._interval > 0:
            seen = self._phase + self._interval * math.floor((seen - self._phase) / self._interval)
        history = self.worker.history
        while len(history) > 1 and history[1][0] <= seen:
            history.popleft()
        return history[0][1]

