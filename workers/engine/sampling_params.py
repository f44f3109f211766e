"""Sampling parameters of one request: frozen, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import InvalidRequest

# A temperature below this samples as greedy: dividing logits by it would overflow float32
# (1e-40 turned every logit into inf or NaN) and the distribution is a point mass anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
# repetition_penalty divides (or multiplies) logits by the penalty: below this floor a logit
# could overflow, and no use needs a stronger pull towards repetition.
MIN_REPETITION_PENALTY = 0.1
MAX_REPETITION_PENALTY = 2.0
# The router's limits (router/openai/schemas.py), kept here for any other sender of the wire.
MAX_LOGIT_BIAS = 300
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64

if TYPE_CHECKING:
    from core.pb.electron.v1.worker_pb2 import GrammarSpec


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how. ``temperature`` 0 (or below ``GREEDY_BELOW_TEMPERATURE``)
    means greedy.

    ``max_tokens`` None means "up to the context window". ``stop_token_ids`` are extra stop
    tokens beside the model's EOS ids (which ``ignore_eos`` disables).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0  # 1: no nucleus filtering; 0: only the likeliest token
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    # Constrained decoding (core/grammar.py builds its grammar); None: unconstrained.
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"'{param}' {why}", param=param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not 1 <= self.n <= 16:
            raise bad("n", "must be between 1 and 16")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be between 0 and 2")
        if not 0.0 <= self.top_p <= 1.0:
            raise bad("top_p", "must be between 0 and 1")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be between 0 and 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be between -2 and 2")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be between {MIN_REPETITION_PENALTY:g} and "
                      f"{MAX_REPETITION_PENALTY:g}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"may hold at most {MAX_LOGIT_BIAS} tokens")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise bad("logit_bias", "keys must be token ids >= 0")
            if not isinstance(bias, (int, float)) or not math.isfinite(bias) or not -100 <= bias <= 100:
                raise bad("logit_bias", "values must be between -100 and 100")
        if len(self.stop) > 4:
            raise bad("stop", "may hold at most 4 strings")
        if any(not s for s in self.stop):
            raise bad("stop", "strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise bad("stop", f"strings may be at most {MAX_STOP_CHARS} characters long")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} token ids")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", "must not exceed max_tokens")
        if not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "must be between 0 and 20")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "requires logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE
