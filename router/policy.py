"""Routing policies: which worker serves the next request.

Every policy has the same small interface (``RoutingPolicy``): ``choose`` picks one of the
candidates (``WorkerView``s: last reported load plus this router's own in-flight counts) and
commits to it, recording whatever the policy keeps about its choices; ``forget`` undoes that
record for a request that never ran there (its worker failed before the first token);
``remove_worker`` drops what the policy keeps about a worker that left.

The policies, chosen by ``router.policy`` in the config:
- ``round_robin``: each worker in turn, whatever its load;
- ``least_load``: the lowest ``load_score`` (queued prefill tokens + requests);
- ``power_of_two``: the lower ``load_score`` of two workers drawn at random;
- ``cache_aware``: the approximate character-tree policy of sglang's router
  (``router.cache_aware``);
- ``kv_aware`` (default): the lowest predicted time to first token from the exact prefix
  index and a per-model cost profile, under a cap on any worker's share (``router.kv_aware``).

Plain Python: no gRPC, no torch; the routing simulator drives these same classes.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from cluster.config import RouterConfig
from router.prefix_index import PendingBlocks, PrefixIndex
from router.worker_view import WorkerLoad, WorkerView, requests_at

if TYPE_CHECKING:
    from router.cost_model import CostProfile

__all__ = ["Choice", "LeastLoad", "PolicyName", "PowerOfTwo", "RequestInfo", "RoundRobin",
           "RoutingPolicy", "WorkerLoad", "WorkerView", "load_score", "make_policy"]

W = TypeVar("W", bound=WorkerView)


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about the request being routed."""

    request_id: str
    num_prompt_tokens: int
    # The prompt's full blocks, chained (cluster.hashing.block_hashes with the tenant's salt
    # and the public model id), and the block size they were cut with. Empty when the policy
    # does not use them or no worker told the router its block size yet.
    block_hashes: tuple[int, ...] = ()
    block_size: int = 0
    # The text cache_aware matches on: the messages' contents, as sglang's router uses.
    text: str = ""


@dataclass(frozen=True)
class Choice(Generic[W]):
    worker: W
    reason: str  # why this worker, for logs and traces
    # Tokens this request will prefill there (the prompt less the prefix it holds).
    prefill_tokens: int
    predicted_ttft_s: float | None = None
    pending: PendingBlocks | None = None  # the index's record of this assignment (kv_aware)
    # ``reason`` in a few words from a small fixed set (a metric label); "" means the
    # policy's name.
    label: str = ""


class RoutingPolicy(Protocol):
    name: str
    uses_block_hashes: bool  # RequestInfo.block_hashes must be filled in
    uses_text: bool          # RequestInfo.text must be filled in

    def choose(self, candidates: Sequence[W], request: RequestInfo) -> Choice[W]:
        """Picks one of ``candidates`` (never empty, in a stable order) and records it."""
        ...

    def forget(self, choice: Choice[W]) -> None:
        """The request never ran there: withdraw what ``choose`` recorded for it."""
        ...

    def remove_worker(self, worker_id: str) -> None:
        """The worker left: drop what the policy keeps about it."""
        ...


def load_score(worker: WorkerView) -> int:
    """Queued prefill tokens plus requests in the worker (see ``requests_at``)."""
    return worker.load.waiting_prefill_tokens + requests_at(worker)


def _describe_load(worker: WorkerView) -> str:
    load = worker.load
    return (f"waiting_prefill_tokens={load.waiting_prefill_tokens} running={load.running} "
            f"waiting={load.waiting} in_flight={worker.in_flight}")


class _Stateless:
    """``forget`` and ``remove_worker`` for policies that keep nothing per request."""

    uses_block_hashes = False
    uses_text = False

    def forget(self, choice: Choice[W]) -> None:
        return None

    def remove_worker(self, worker_id: str) -> None:
        return None


class RoundRobin(_Stateless):
    """Each worker in turn, whatever its load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[W], request: RequestInfo) -> Choice[W]:
        worker = candidates[next(self._counter) % len(candidates)]
        return Choice(worker, "round_robin", request.num_prompt_tokens, label="turn")


class LeastLoad(_Stateless):
    """The worker with the lowest ``load_score``; equal scores take turns."""

    name = "least_load"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[W], request: RequestInfo) -> Choice[W]:
        scores = [load_score(w) for w in candidates]
        best = min(scores)
        tied = [w for w, s in zip(candidates, scores) if s == best]
        worker = tied[next(self._counter) % len(tied)]
        return Choice(worker, f"least_load score={best} {_describe_load(worker)} "
                              f"tied={len(tied)}", request.num_prompt_tokens,
                      label="least_load")


class PowerOfTwo(_Stateless):
    """Two distinct workers drawn at random; the lower ``load_score`` wins (the first drawn on
    ties). Seeded, so a simulation replays."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[W], request: RequestInfo) -> Choice[W]:
        if len(candidates) == 1:
            return Choice(candidates[0], "power_of_two single candidate",
                          request.num_prompt_tokens, label="single_candidate")
        a, b = self._rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        sa, sb = load_score(first), load_score(second)
        worker, other, score, other_score = (
            (first, second, sa, sb) if sa <= sb else (second, first, sb, sa))
        return Choice(worker, f"power_of_two score={score} vs {other.worker_id} score="
                              f"{other_score} {_describe_load(worker)}",
                      request.num_prompt_tokens, label="lower_load")


PolicyName = Literal["kv_aware", "cache_aware", "power_of_two", "least_load", "round_robin"]


def make_policy(settings: RouterConfig | PolicyName, index: PrefixIndex | None = None, *,
                profile: CostProfile | None = None,
                clock: Callable[[], float] = time.monotonic) -> RoutingPolicy:
    """The policy ``settings.policy`` names, with its settings. ``index`` is the prefix index
    the worker streams feed (kv_aware); ``profile`` defaults to ``settings.cost_profile``;
    ``clock`` (monotonic seconds) is a simulator's clock in simulations. A bare policy name
    takes every setting's default."""
    if isinstance(settings, str):
        settings = RouterConfig(policy=settings)
    name = settings.policy
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "cache_aware":
        from router.cache_aware import CacheAware  # it imports this module

        return CacheAware(cache_threshold=settings.cache_threshold,
                          balance_abs_threshold=settings.balance_abs_threshold,
                          balance_rel_threshold=settings.balance_rel_threshold,
                          eviction_interval_s=settings.eviction_interval_s,
                          max_tree_size=settings.max_tree_size, clock=clock)
    if name == "kv_aware":
        from router.cost_model import resolve_profile
        from router.kv_aware import KvAware  # it imports this module

        return KvAware(index if index is not None else PrefixIndex(),
                       profile or resolve_profile(settings.cost_profile),
                       load_cap=settings.load_cap,
                       load_cap_min_requests=settings.load_cap_min_requests,
                       work_weight=settings.work_weight,
                       pending_slack_s=settings.pending_slack_s, clock=clock)
    raise ValueError(f"unknown routing policy {name!r}")
