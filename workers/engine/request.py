"""A request's own progress through the engine.

There is no prefill or decode phase: each step computes some of the tokens the request has
not computed yet (``num_computed_tokens`` catches up with ``num_tokens``); when it has caught
up, the step also samples one new token. All progress lives here, not in side tables.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.hashing import block_hashes

from .outputs import FinishReason
from .sampling_params import SamplingParams
from .stats import Timeline


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # not admitted yet, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class LogitsMask(Protocol):
    """Grammar hook: masks the logits of the next token, then learns the chosen token."""

    def bitmask(self) -> Any:  # int32 words on the CPU (llguidance's layout), or None
        """The next token's mask as a bitmask when that is all there is to apply: the
        sampler applies the bitmasks of a step's rows at once. None: call ``apply``."""
        ...

    def apply(self, logits: Any) -> None:  # a 1-D float tensor of vocabulary size, in place
        ...

    def accept(self, token_id: int) -> None:
        ...


@dataclass(eq=False)
class Request:
    """One sequence. For ``n > 1`` the engine makes n of these, ``index`` 0..n-1."""

    request_id: str          # unique in the engine: parent id, plus "#i" for index i > 0
    parent_id: str           # the caller's request id
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_key: bytes = b""   # extra key of the block hashes (tenant salt, model id)
    block_size: int = 16
    priority: int = 0        # higher is admitted first and preempted last
    index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # Token limit: prompt + max completion tokens, clamped to the context window.
    max_total_tokens: int = 0

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache at first admission (kept across preemption).
    num_cached_tokens: int | None = None
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # A sibling (same prompt, n > 1) whose prompt must be computed first, so this one finds
    # the prompt's blocks in the cache instead of computing them again.
    wait_for: Request | None = None
    logits_mask: LogitsMask | None = None
    # The sampler's random stream key (from the seed, or the OS), made on first use.
    rng_key: int | None = None
    # Opaque per-request state of the engine's output side (detokenizer, stream queue).
    output_state: Any = None
    timeline: Timeline = field(default_factory=Timeline)  # for traces and metrics

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.block_hashes = block_hashes(self.token_ids, self.block_size, self.cache_key)
        if not self.max_total_tokens:
            self.max_total_tokens = self.num_prompt_tokens + (self.sampling.max_tokens or 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            parent = self.block_hashes[-1] if self.block_hashes else None
            start = len(self.block_hashes) * self.block_size
            self.block_hashes.extend(
                block_hashes(self.token_ids, self.block_size, self.cache_key, parent, start))
