"""Routing policies: which worker serves the next request.

Every policy has the same small interface (``RoutingPolicy``): ``choose`` picks one of the
candidates (``WorkerView``s: last reported load plus this router's own in-flight counts) and
commits to it, recording whatever the policy keeps about its choices; ``forget`` undoes that
record for a request that never ran there (its worker failed before the first token);
``remove_worker`` drops what the policy keeps about a worker that left.

The policies, chosen by ``router.policy`` in the config (``make_policy`` in
router/routing/factory.py builds the one named):
- ``round_robin``: each worker in turn, whatever its load;
- ``least_load``: the lowest ``load_score`` (queued prefill tokens + requests);
- ``power_of_two``: the lower ``load_score`` of two workers drawn at random
  (these three: router/routing/simple.py);
- ``cache_aware``: the approximate character-tree policy of sglang's router
  (``router.routing.cache_aware``);
- ``kv_aware`` (default): the lowest predicted time to first token from the exact prefix
  index and a per-model cost profile, under a cap on any worker's share (``router.routing.kv_aware``).

Plain Python: no gRPC, no torch; the routing simulator drives these same classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from router.routing.load import WorkerView, requests_at
from router.routing.prefix_index import PendingBlocks

W = TypeVar("W", bound=WorkerView)


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about the request being routed."""

    request_id: str
    num_prompt_tokens: int
    # The prompt's full blocks, chained (core.hashing.block_hashes with the tenant's salt
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


def describe_load(worker: WorkerView) -> str:
    load = worker.load
    return (f"waiting_prefill_tokens={load.waiting_prefill_tokens} running={load.running} "
            f"waiting={load.waiting} in_flight={worker.in_flight}")
