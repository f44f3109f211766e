"""The routing policies that look only at load: ``round_robin``, ``least_load`` and
``power_of_two`` (router/routing/policy.py describes them all)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from router.routing.policy import Choice, RequestInfo, W, describe_load, load_score


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
        return Choice(worker, f"least_load score={best} {describe_load(worker)} "
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
                              f"{other_score} {describe_load(worker)}",
                      request.num_prompt_tokens, label="lower_load")
