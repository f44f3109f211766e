"""What the engine hands back to its callers: deltas, then one final message."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.protocol import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP

if TYPE_CHECKING:
    from .output_processor import OutputState
    from .sampler import RawLogprobs
    from .stats import Timeline


class FinishReason(str, enum.Enum):
    """Its values are what ``GenerateResponse.finish_reason`` carries (core/protocol.py)."""

    STOP = FINISH_STOP      # EOS, a stop token or a stop string
    LENGTH = FINISH_LENGTH  # max_tokens or the context window
    ABORT = FINISH_ABORT    # the caller aborted (client gone)
    ERROR = FINISH_ERROR    # the engine could not serve it


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True)
class PositionLogprobs:
    """Log-probability of the chosen token and the top alternatives at one position."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    """One delta of one sequence (``index`` is the choice index for n > 1).

    ``text`` never ends in a broken UTF-8 character and never contains a (partial) stop
    string. The last output of a sequence has ``finish_reason`` set and carries ``usage``
    (usage counts the prompt once, on index 0; other indexes report completion tokens only).
    """

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[PositionLogprobs, ...] = ()
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    error: str | None = None
    timeline: Timeline | None = None  # on the final output: the sequence's milestones
    # With ``error``: the request itself could not be served (its sampling failed on its own
    # row), not the engine; the worker answers it as an invalid request, never retried.
    caused_by_request: bool = False
    # On the final output: the max_tokens budget forced the constrained output's close (it is
    # complete and valid; docs/structured-output.md, "Closing within max_tokens").
    forced_close: bool = False
    # Only on what the engine thread hands the output side (output_processor.py), whose
    # ``text`` and ``logprobs`` are still to be made: the sampler's logprobs per token and
    # the sequence's ``OutputState``. Callers never see them set.
    raw_logprobs: tuple[RawLogprobs, ...] = field(default=(), repr=False, compare=False)
    pending: OutputState | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Progress:
    """Yielded by ``AsyncEngine.generate`` in place of an output when its request produced
    nothing for a while: it is alive, queued (``queue_position`` waiting requests ahead of it)
    or running (a long prompt)."""

    queued: bool
    queue_position: int = 0
