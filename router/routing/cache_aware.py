"""``cache_aware``: the policy of sglang's router, as a baseline for ``kv_aware`` to beat.

It never sees the workers' caches. It remembers which text it sent where, in an approximate
character tree (``ApproxTree``), and assumes that is what each worker caches:

1. Load is this router's own count of unfinished requests per worker (sglang's
   ``worker.load()``). The system is imbalanced when ``max - min > balance_abs_threshold``
   and ``max > min * balance_rel_threshold``; then the least loaded worker wins.
2. Otherwise the longest tree match wins if it covers more than ``cache_threshold`` of the
   text; below that, the worker with the least text in the tree (most cache room) wins.
3. Either way the text is inserted for the winner; every ``eviction_interval_s`` each
   worker's text is trimmed to ``max_tree_size`` characters, least recently used leaves first.

Defaults are sglang router's command-line defaults (cache_threshold 0.3,
balance_abs_threshold 64, balance_rel_threshold 1.5, eviction every 120 s, 2**26 characters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from core.config import RouterConfig
from router.routing.approx_tree import ApproxTree
from router.routing.policy import Choice, RequestInfo, W


class CacheAware:
    name = "cache_aware"
    uses_block_hashes = False
    uses_text = True

    def __init__(self, settings: RouterConfig, *, clock: Callable[[], float] = time.monotonic):
        """``settings``: the router's (``cache_threshold``, ``balance_abs_threshold``,
        ``balance_rel_threshold``, ``eviction_interval_s``, ``max_tree_size``)."""
        self.cache_threshold = settings.cache_threshold
        self.balance_abs_threshold = settings.balance_abs_threshold
        self.balance_rel_threshold = settings.balance_rel_threshold
        self.eviction_interval_s = settings.eviction_interval_s
        self.max_tree_size = settings.max_tree_size
        self.tree = ApproxTree()
        self._clock = clock
        self._next_eviction = clock() + self.eviction_interval_s

    def choose(self, candidates: Sequence[W], request: RequestInfo) -> Choice[W]:
        now = self._clock()
        if now >= self._next_eviction:
            self.tree.evict(self.max_tree_size)
            self._next_eviction = now + self.eviction_interval_s
        loads = [w.in_flight for w in candidates]
        high, low = max(loads), min(loads)
        text = request.text
        if (high - low > self.balance_abs_threshold
                and high > low * self.balance_rel_threshold):
            worker = candidates[loads.index(low)]
            reason = f"cache_aware imbalanced (in_flight max={high} min={low}): shortest queue"
            label = "imbalanced"
        else:
            by_id = {w.worker_id: w for w in candidates}
            matched, tenant = self.tree.prefix_match(text, by_id)
            rate = matched / len(text) if text else 0.0
            if tenant is not None and rate > self.cache_threshold:
                worker = by_id[tenant]
                reason = f"cache_aware match {rate:.2f} > {self.cache_threshold}"
                label = "cache_match"
            else:
                worker = by_id[self.tree.smallest([w.worker_id for w in candidates])]
                reason = (f"cache_aware match {rate:.2f} <= {self.cache_threshold}: smallest "
                          f"tree ({self.tree.size(worker.worker_id)} chars)")
                label = "smallest_tree"
        self.tree.insert(text, worker.worker_id, now)
        return Choice(worker, f"{reason} in_flight={worker.in_flight}",
                      request.num_prompt_tokens, label=label)

    def forget(self, choice: Choice[W]) -> None:
        return None  # sglang keeps the text of a failed request in the tree too

    def remove_worker(self, worker_id: str) -> None:
        self.tree.remove_tenant(worker_id)
