"""``kv_aware``: route to the lowest predicted time to first token, from exact KV state.

For each candidate worker:

    cached   = the prompt's leading blocks the worker holds, from the prefix index (its KV
               events plus this router's pending assignments), in tokens; the last prompt
               token is always recomputed (its logits are needed)
    uncached = prompt tokens - cached
    queued   = prefill tokens waiting there (``queued_prefill_tokens``: the larger of its
               report and this router's unstarted requests there)
    decoders = requests there (``requests_at``): they decode while this prompt prefills
    ttft     = profile.predicted_ttft_s(queued, uncached, decoders)
    score    = ttft + work_weight * profile.prefill_s(uncached)

The lowest score wins; ties go to the most cached prefix, then the fewest requests, then
take turns. ``work_weight`` charges the prefill work a choice adds to the cluster: greedy TTFT
alone would recompute a hot prefix on an idle worker to save a few milliseconds of queueing,
and every such copy is compute the next requests wait behind (0 is pure TTFT-greedy).

Load cap: a worker whose request count after this one would exceed
``max(load_cap_min_requests, load_cap * fair share)`` is skipped (fair share = requests in
all candidates, this one included, over their number), so a hot prefix spills to the next
best worker, which then caches (replicates) it. Only when every worker is over the cap does
the cap give way.

Cold workers: while no worker is over the cap, a worker whose cache is empty (it just
joined, or was reset) is matched as holding the prefix that every other candidate holds,
when at least two others hold it (shared traffic, typically a system prompt). It will hold
that prefix after its first request; without this, while nothing spills, every request saves
that prefix's prefill on a warm worker and a cold one never gets any (the routing simulator,
Mooncake trace, 64 workers: 39 never got a request, and their caches went unused). Once a
worker is over the cap, spilling moves traffic anyway, and a prefix that spills replicated
is one hot conversation, not shared traffic: it is not lent to cold workers.

The chosen worker's prompt blocks that it does not hold yet become pending in the index
until the predicted TTFT plus ``pending_slack_s`` has passed (the time for its KV events to
come back), so the next requests sharing the prefix see it there at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from core.config import RouterConfig
from router.routing.cost_model import CostProfile
from router.routing.load import queued_prefill_tokens, requests_at
from router.routing.policy import Choice, RequestInfo, W
from router.routing.prefix_index import NO_MATCH, PrefixIndex


class KvAware:
    name = "kv_aware"
    uses_block_hashes = True
    uses_text = False

    def __init__(self, index: PrefixIndex, profile: CostProfile, settings: RouterConfig,
                 *, clock: Callable[[], float] = time.monotonic):
        """``settings``: the router's (``load_cap``, ``load_cap_min_requests``,
        ``work_weight``, ``pending_slack_s``; their ranges are checked there)."""
        self.index = index
        self.profile = profile
        self.load_cap = settings.load_cap
        self.load_cap_min_requests = settings.load_cap_min_requests
        self.work_weight = settings.work_weight
        self.pending_slack_s = settings.pending_slack_s
        self._clock = clock
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[W], request: RequestInfo) -> Choice[W]:
        now = self._clock()
        hashes = request.block_hashes
        match = self.index.match(hashes, now) if hashes and request.block_size else NO_MATCH
        profile, prompt, block_size = self.profile, request.num_prompt_tokens, request.block_size
        count = len(candidates)
        requests = [requests_at(w) for w in candidates]
        limit = max(self.load_cap_min_requests, self.load_cap * (sum(requests) + 1) / count)
        turn = next(self._turn) % count
        best: tuple[tuple[float, int, int, int], int, float] | None = None
        fallback: tuple[tuple[float, int, int, int], int, float] | None = None
        over_cap = 0
        matched = match.blocks
        if matched and all(r + 1 <= limit for r in requests):
            matched = self._with_cold_workers(candidates, matched)
        ttft_of, work_weight = profile.predicted_ttft_s, self.work_weight
        full_work = work_weight * profile.prefill_s(prompt)  # most workers hold nothing
        for i, worker in enumerate(candidates):
            blocks = matched.get(worker.worker_id, 0)
            if blocks:
                cached = min(blocks * block_size, prompt - 1)
                work = work_weight * profile.prefill_s(prompt - cached)
            else:
                cached, work = 0, full_work
            ttft = ttft_of(queued_prefill_tokens(worker), prompt - cached, requests[i])
            key = (ttft + work, -cached, requests[i], (i - turn) % count)
            if fallback is None or key < fallback[0]:
                fallback = (key, i, ttft)
            if requests[i] + 1 > limit:
                over_cap += 1
            elif best is None or key < best[0]:
                best = (key, i, ttft)
        assert fallback is not None  # candidates is never empty
        capped = best is None
        key, i, ttft = fallback if best is None else best
        worker = candidates[i]
        cached = -key[1]
        matched_blocks = match.blocks.get(worker.worker_id, 0)
        pending_blocks = matched_blocks - match.cached.get(worker.worker_id, 0)
        pending = None
        if hashes and block_size:
            pending = self.index.add_pending(worker.worker_id, hashes[matched_blocks:],
                                             now + ttft + self.pending_slack_s)
        load = worker.load
        reason = (f"kv_aware ttft={ttft * 1000:.1f}ms score={key[0] * 1000:.1f}ms "
                  f"cached={cached}/{prompt} tokens ({pending_blocks} blocks pending) "
                  f"queued=max({load.waiting_prefill_tokens},{worker.in_flight_tokens}) tokens "
                  f"requests={requests[i]} cap={limit:.1f} over_cap={over_cap}/{count}"
                  + (" (every worker over the cap)" if capped else ""))
        if capped:
            label = "all_over_cap"
        elif max(matched.values(), default=0) > matched.get(worker.worker_id, 0):
            label = "load_over_cache"  # another worker held more, but was slower or capped
        else:
            label = "cache_hit" if cached else "no_cache"
        return Choice(worker, reason, prompt - cached, predicted_ttft_s=ttft, pending=pending,
                      label=label)

    def _with_cold_workers(self, candidates: Sequence[W],
                           matched: dict[str, int]) -> dict[str, int]:
        """``matched`` with each cold worker (its stream reported an empty cache, and nothing
        is pending there) matching the prefix that every other candidate, two at least,
        holds."""
        cold: list[str] = []
        common, warm = 0, 0
        for worker in candidates:
            worker_id = worker.worker_id
            depth = matched.get(worker_id, 0)
            handle = self.index.worker(worker_id)
            if (not depth and handle is not None and handle.sequence is not None
                    and not handle.hashes):
                cold.append(worker_id)
            else:
                common = depth if not warm else min(common, depth)
                warm += 1
        if not cold or warm < 2 or not common:
            return matched
        return {**matched, **dict.fromkeys(cold, common)}

    def forget(self, choice: Choice[W]) -> None:
        self.index.drop_pending(choice.pending)

    def remove_worker(self, worker_id: str) -> None:
        return None  # the index purges a worker when its stream's handle leaves
