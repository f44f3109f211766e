"""The discrete-event loop: a trace replayed through one real routing policy onto N
simulated workers.

The policy is the router's own (``router.routing.policy.make_policy`` with the simulation's clock,
the router's ``PrefixIndex`` fed by the workers' KV events, the router's ``LocalLoad``
counts): at each arrival it chooses among the workers' ``SimView``s, the request is counted
there (``LocalLoad.assign``, as ``WorkerPool.acquire`` does) and queued on the worker; its
first token ``started()`` the assignment and its end ``finish()``es it, as the router's
lease does. Nothing of the policies is re-implemented here.

Events (a heap ordered by time, then by the order they were scheduled): a worker's step end
and the delivery of a worker's KV events to the index. Arrivals come from the trace in order
and go first among events at the same time; load reports need no events (``SimView.load``
reads the worker's state at its last report tick).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.sim.service import ServiceModel
from bench.sim.trace import BLOCK_TEXT_CHARS, BlockText, TraceRequest
from bench.sim.worker import Delays, Job, SimView, SimWorker
from core.config import RouterConfig
from router.routing.cost_model import CostProfile
from router.routing.factory import make_policy
from router.routing.policy import RequestInfo, RoutingPolicy
from router.routing.prefix_index import PrefixIndex
from router.routing.simple import PowerOfTwo

STEP_END, DELIVER = 0, 1
# cache_aware's tree limit counts characters of real text, ~4 per token.
CHARS_PER_TOKEN = 4


@dataclass
class Outcome:
    """What one run measured, per request (in trace order) and per worker."""

    policy: str
    workers: int
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    hit_blocks: int = 0
    prompt_blocks: int = 0
    requests_per_worker: list[int] = field(default_factory=list)
    prefill_tokens_per_worker: list[int] = field(default_factory=list)
    makespan_s: float = 0.0


class Simulation:
    def __init__(self, requests: Sequence[TraceRequest], *, policy_name: str, workers: int,
                 cache_blocks: int, block_size: int, service: ServiceModel,
                 policy_profile: CostProfile, settings: RouterConfig, delays: Delays,
                 seed: int = 0):
        if workers < 1 or cache_blocks < 1:
            raise ValueError("workers and cache_blocks must be >= 1")
        self.requests = requests
        self.block_size = block_size
        self.now = 0.0
        self._heap: list[tuple[float, int, int, SimWorker, int]] = []
        self._order = itertools.count()
        self.index = PrefixIndex()
        rng = random.Random(seed)
        self.workers: list[SimWorker] = []
        self.views: list[SimView] = []
        for i in range(workers):
            worker_id = f"w{i:03d}"
            worker = SimWorker(
                worker_id, num_blocks=cache_blocks, block_size=block_size, service=service,
                rng=random.Random(rng.getrandbits(64)), handle=self.index.join(worker_id),
                delays=delays, schedule=self._schedule, on_first_token=self._first_token,
                on_finish=self._finished)
            self.workers.append(worker)
            self.views.append(SimView(worker, self._clock, delays,
                                      phase=rng.random() * delays.load_interval_s))
        self._view_index = {v.worker_id: i for i, v in enumerate(self.views)}
        self.policy = self._make_policy(policy_name, settings, policy_profile, seed)
        self._text = BlockText() if self.policy.uses_text else None
        self.outcome = Outcome(policy_name, workers, ttft_s=[0.0] * len(requests),
                               e2e_s=[0.0] * len(requests))
        self._assigned = [0] * workers

    def _make_policy(self, name: str, settings: RouterConfig, profile: CostProfile,
                     seed: int) -> RoutingPolicy:
        if name == "power_of_two":
            return PowerOfTwo(seed=seed)  # make_policy's is unseeded; a replay must repeat
        update: dict[str, object] = {"policy": name}
        if name == "cache_aware":
            # Its tree holds BLOCK_TEXT_CHARS per block instead of ~4 characters per token:
            # scale its size limit so that it stands for as many tokens as configured.
            scale = BLOCK_TEXT_CHARS / (CHARS_PER_TOKEN * self.block_size)
            update["max_tree_size"] = max(1, int(settings.max_tree_size * scale))
        return make_policy(settings.model_copy(update=update), self.index, profile=profile,
                           clock=self._clock)

    def _clock(self) -> float:
        return self.now

    def _schedule(self, at: float, kind: int, worker: SimWorker, payload: int) -> None:
        heapq.heappush(self._heap, (at, next(self._order), kind, worker, payload))

    # -- callbacks from workers

    def _first_token(self, job: Job, now: float) -> None:
        job.assignment.started()
        self.outcome.hit_blocks += job.hit_blocks
        self.outcome.ttft_s[job.request.index] = now - job.request.arrival_s

    def _finished(self, job: Job, now: float) -> None:
        job.assignment.finish()
        self.outcome.e2e_s[job.request.index] = now - job.request.arrival_s

    # -- the loop

    def _route(self, request: TraceRequest) -> None:
        full = min(request.num_blocks, request.input_length // self.block_size)
        policy = self.policy
        info = RequestInfo(
            f"r{request.index}", request.input_length,
            block_hashes=request.block_hashes[:full] if policy.uses_block_hashes else (),
            block_size=self.block_size if policy.uses_block_hashes else 0,
            text=self._text.of(request) if self._text is not None else "")
        choice = policy.choose(self.views, info)
        view = choice.worker
        i = self._view_index[view.worker_id]
        self._assigned[i] += 1
        job = Job(request, view.local.assign(choice.prefill_tokens), self.block_size)
        self.workers[i].enqueue(job, self.now)

    def run(self) -> Outcome:
        heap = self._heap
        requests = self.requests
        n, i = len(requests), 0
        while i < n or heap:
            if i < n and (not heap or requests[i].arrival_s <= heap[0][0]):
                request = requests[i]
                i += 1
                self.now = max(self.now, request.arrival_s)
                self._route(request)
                continue
            at, _, kind, worker, payload = heapq.heappop(heap)
            self.now = at
            if kind == STEP_END:
                worker.step_end(at, payload)
            else:
                worker.deliver(payload)
        return self._summarise()

    def _summarise(self) -> Outcome:
        out = self.outcome
        out.makespan_s = self.now
        out.requests_per_worker = list(self._assigned)
        out.prefill_tokens_per_worker = [w.prefill_tokens for w in self.workers]
        out.prompt_blocks = sum(r.num_blocks for r in self.requests)
        return out

