"""The output side: what the engine thread computed for a sequence, made into the text,
logprobs and usage its caller receives.

The engine thread hands over each step's token (and raw logprobs) per sequence, with its
text still empty. Making the text (the incremental detokenizer, stop strings, the token
texts of logprobs) is pure Python per token, so it runs away from the engine thread where
it can: ``AsyncEngine`` makes outputs on its event loop as it hands them over, while the
engine thread already runs the next step (on a GPU the step's kernels run then, and the
engine thread waits for them without holding the GIL). Synchronous callers get them made
inline by ``Engine.step``.

A stop string can only be found here. When one matches, the sequence ends for its caller
at once (text cut before the stop string, finish reason ``stop``, usage counting the tokens
up to the one that completed it) and the engine is told to stop it
(``Engine.stop_sequences``). The engine may have run one more step for it by then: that
token is computed but never shown or billed, and the engine's own final output for the
sequence is dropped here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from core.tokenizer import Tokenizer

from .detokenizer import IncrementalDetokenizer
from .outputs import FinishReason, PositionLogprobs, RequestOutput, TokenLogprob, Usage

if TYPE_CHECKING:
    from .request import Request
    from .sampler import RawLogprobs


class OutputState:
    """One sequence's output side. Used by one thread at a time: the one making its outputs
    (never the engine thread while an ``AsyncEngine`` runs it)."""

    def __init__(self, tokenizer: Tokenizer, request: Request, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._request = request
        self._detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                                   tuple(stop))
        self.sequence_id = request.request_id
        self.num_tokens = 0  # generated tokens made into output so far
        self.done = False    # its final output is made: whatever comes later is dropped

    def make(self, raw: RequestOutput) -> tuple[RequestOutput | None, bool]:
        """The output for the caller (None: nothing to send), and whether the engine must
        now stop the sequence (a stop string matched before the engine finished it)."""
        if self.done:
            return None, False
        text, matched, used = "", None, 0
        for token in raw.token_ids:
            used += 1
            piece, matched = self._detokenizer.add(token)
            text += piece
            if matched is not None:
                break
        self.num_tokens += used
        logprobs = tuple(self._logprobs(token, lp)
                         for token, lp in zip(raw.token_ids[:used], raw.raw_logprobs))
        if matched is not None:
            self.done = True
            req = self._request
            return RequestOutput(
                raw.request_id, raw.index, raw.token_ids, text, logprobs,
                finish_reason=FinishReason.STOP, stop_reason=matched,
                usage=Usage(req.num_prompt_tokens, req.num_cached_tokens or 0, self.num_tokens),
                timeline=raw.timeline or _finished_now(req),
                forced_close=raw.forced_close), not raw.finished
        if not raw.finished:  # the common case: built directly (``replace`` costs 4x more)
            return RequestOutput(raw.request_id, raw.index, raw.token_ids, text, logprobs), False
        self.done = True
        if raw.token_ids:  # it ended at this token (EOS, a stop token, the length)
            text += self._detokenizer.finish()
        return dataclasses.replace(raw, text=text, logprobs=logprobs, raw_logprobs=(),
                                   pending=None), False

    def _logprobs(self, token: int, raw: RawLogprobs) -> PositionLogprobs:
        tok = self._tokenizer
        return PositionLogprobs(
            chosen=TokenLogprob(tok.token_text(token), raw.chosen_logprob, tok.token_bytes(token)),
            top=tuple(TokenLogprob(tok.token_text(i), lp, tok.token_bytes(i))
                      for i, lp in zip(raw.top_ids, raw.top_logprobs)))


def make_outputs(raws: Sequence[RequestOutput]) -> tuple[list[RequestOutput], list[str]]:
    """The callers' outputs of raw ones (in order), and the sequence ids the engine must stop
    because a stop string ended them."""
    made: list[RequestOutput] = []
    stop: list[str] = []
    for raw in raws:
        state = raw.pending
        if state is None:  # already made
            made.append(raw)
            continue
        out, stop_it = state.make(raw)
        if out is not None:
            made.append(out)
        if stop_it:
            stop.append(state.sequence_id)
    return made, stop


def _finished_now(req: Request):
    """A copy of the sequence's timeline, finished now (the engine thread owns the original
    and may still run a step for it)."""
    timeline = req.timeline
    return dataclasses.replace(timeline, prefill_chunks=list(timeline.prefill_chunks),
                               finished_ns=time.time_ns(), num_preemptions=req.num_preemptions)
