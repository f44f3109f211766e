"""The engine core: one step schedules, runs the model, samples and emits deltas.

Single-threaded by design: only the engine thread (see ``async_engine.py``) calls
``add``/``run_step``/``abort_sequences``/``stop_sequences``. Validation (``make_requests``)
is pure and may run anywhere. Those return raw outputs whose text the output side makes
(output_processor.py: on the AsyncEngine's event loop, overlapping the next step);
``step`` and ``abort`` make it inline, for synchronous callers.
"""

from __future__ import annotations

import logging
import time

from core.config import EngineConfig
from core.errors import ContextLengthExceeded, InvalidRequest
from core.hashing import extra_key
from core.tokenizer import Tokenizer

from .grammar import GrammarCompiler
from .kv_cache_manager import KVCacheManager
from .model_runner import BatchItem, ModelRunner
from .output_processor import OutputState, make_outputs
from .outputs import FinishReason, RequestOutput, Usage
from .request import Request
from .sampler import RawLogprobs, Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .stats import EngineStats

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig, *,
                 model_name: str = ""):
        """``config``: the engine's settings (``max_num_seqs``, ``max_num_batched_tokens``,
        ``enable_prefix_caching``, ``grammar_cache_size``, ``grammar_overlap``); the runner
        was built from the model and cache ones."""
        max_num_batched_tokens = config.max_num_batched_tokens
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(
            runner.model_config.eos_token_ids)
        self.kv = KVCacheManager(runner.num_blocks, self.block_size,
                                 config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=max(max_num_batched_tokens, self.block_size),
                            long_prefill_token_threshold=max_num_batched_tokens,
                            max_model_len=self.max_model_len),
            self.kv)
        self.sampler = Sampler(self.vocab_size, tuple(sorted(self.eos_token_ids)))
        # True when the last step found nothing to run (queued work waits for a sibling).
        self.idle = False
        self._grammar_options = {"cache_size": config.grammar_cache_size,
                                 "overlap": config.grammar_overlap,
                                 "mask_timeout_s": config.grammar_mask_timeout_s}
        self._grammars: GrammarCompiler | None = None
        self.stats = EngineStats()

    @property
    def grammars(self) -> GrammarCompiler:
        """Built on first use: its tokenizer set-up costs ~0.2 s."""
        if self._grammars is None:
            eos = dict.fromkeys((*self.tokenizer.eos_token_ids, *sorted(self.eos_token_ids)))
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, tuple(eos),
                                             **self._grammar_options)
        return self._grammars

    # -- requests in -------------------------------------------------------------------------

    def make_requests(self, request_id: str, prompt_token_ids: list[int],
                      sampling: SamplingParams, priority: int = 0,
                      cache_salt: str = "") -> list[Request]:
        """Validates a request and builds its n sequences; raises before anything is queued."""
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="token_ids")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})", param="token_ids")
        if any(not 0 <= t < self.vocab_size for t in sampling.stop_token_ids):
            raise InvalidRequest("stop_token_ids names a token outside the vocabulary",
                                 param="stop_token_ids")
        if any(not 0 <= t < self.vocab_size for t in sampling.logit_bias):
            raise InvalidRequest("logit_bias names a token outside the vocabulary",
                                 param="logit_bias")
        num_prompt = len(prompt_token_ids)
        if num_prompt >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {num_prompt} tokens; this model's context window is "
                f"{self.max_model_len} tokens, and at least one must be left to generate",
                param="messages")
        if sampling.max_tokens is None:
            max_total = self.max_model_len
        else:
            max_total = num_prompt + sampling.max_tokens
            if max_total > self.max_model_len:
                raise ContextLengthExceeded(
                    f"the prompt ({num_prompt} tokens) plus max_tokens ({sampling.max_tokens}) "
                    f"exceeds the context window of {self.max_model_len} tokens",
                    param="max_tokens")
        key = extra_key(cache_salt, self.model_name)
        # Compiled (or found in the cache) before anything is queued: a bad grammar fails here.
        masks = None
        if sampling.grammar is not None:
            budget = max_total - num_prompt
            minimum = self.grammars.minimum_tokens(sampling.grammar)
            if minimum is not None and budget < minimum:
                what = ("tool call" if sampling.grammar.WhichOneof("kind") == "tool_calls"
                        else "JSON value")
                raise InvalidRequest(
                    f"max_tokens ({budget}) is below the {minimum} tokens of the shortest "
                    f"{what} this request's {grammar_source(sampling)} allows; set "
                    f"max_tokens to at least {minimum}", param="max_tokens")
            masks = [self.grammars.matcher(sampling.grammar, budget)
                     for _ in range(sampling.n)]
        requests: list[Request] = []
        for index, sequence_id in enumerate(sequence_ids(request_id, sampling.n)):
            req = Request(
                request_id=sequence_id,
                parent_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=sampling,
                cache_key=key, block_size=self.block_size, priority=priority, index=index,
                max_total_tokens=max_total)
            # Siblings wait until the first sequence has computed the prompt, then find its
            # blocks in the prefix cache instead of computing them again.
            req.wait_for = requests[0] if requests else None
            req.logits_mask = masks[index] if masks is not None else None
            req.output_state = OutputState(self.tokenizer, req, sampling.stop)
            requests.append(req)
        return requests

    def add(self, requests: list[Request]) -> None:
        for req in requests:
            self.scheduler.add_request(req)

    def abort_sequences(self, request_ids: list[str]) -> list[RequestOutput]:
        """Aborts sequences in any state, freeing their blocks at once (raw outputs)."""
        outputs = []
        for rid in request_ids:
            req = self.scheduler.abort_request(rid)
            if req is not None:
                outputs.append(self._final(req, ()))
        return outputs

    def stop_sequences(self, request_ids: list[str]) -> list[RequestOutput]:
        """Finishes sequences that a stop string ended on the output side (raw outputs: that
        side made their final output already and drops these)."""
        outputs = []
        for rid in request_ids:
            req = self.scheduler.get_request(rid)
            if req is not None and not req.is_finished:
                self.scheduler.finish_request(req, FinishReason.STOP)
                outputs.append(self._final(req, ()))
        return outputs

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """``abort_sequences`` with the outputs made (synchronous callers)."""
        return make_outputs(self.abort_sequences(request_ids))[0]

    def step(self) -> list[RequestOutput]:
        """One step with its outputs made here, sequences ended by a stop string stopped at
        once (synchronous callers: the AsyncEngine runs ``run_step``)."""
        outputs, stop = make_outputs(self.run_step())
        self.stop_sequences(stop)
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- one step ----------------------------------------------------------------------------

    def run_step(self) -> list[RequestOutput]:
        """One step: its raw outputs (text still to be made, see output_processor.py)."""
        out = self.scheduler.schedule()
        self.idle = not out.scheduled
        if self.idle:
            return []
        batch = [BatchItem(s.request, s.num_new_tokens) for s in out.scheduled]
        sample = [s.request for s in out.scheduled
                  if s.request.num_computed_tokens + s.num_new_tokens == s.request.num_tokens]
        start_ns = time.time_ns()
        try:
            logits = self.runner.execute(batch, sample)
            self.scheduler.update_after_step(out)
            sampled = self.sampler(logits, sample) if sample else None
        except Exception:
            # A failed step must not take the engine down: fail this batch, keep serving.
            log.exception("engine step failed; failing %d requests", len(batch))
            return [self._fail(item.request) for item in batch]
        end_ns = time.time_ns()
        stats = self.stats
        stats.steps += 1
        stats.preemptions += len(out.preempted)
        stats.generation_tokens += len(sample)
        for s in out.scheduled:
            if s.num_computed_tokens < s.request.num_prompt_tokens:
                s.request.timeline.prefill(start_ns, end_ns, s.num_new_tokens)
        outputs: list[RequestOutput] = []
        if sampled is not None:
            for i, (req, token, raw) in enumerate(zip(sample, sampled.token_ids,
                                                      sampled.logprobs)):
                why = sampled.failed.get(i)
                if why is None:
                    outputs.append(self._advance(req, token, raw))
                else:  # this row alone: the rest of the step goes on
                    log.warning("request %s cannot be sampled: %s", req.request_id, why)
                    outputs.append(self._fail(req, f"the request could not be sampled after "
                                              f"{req.num_output_tokens} tokens: {why}",
                                              caused_by_request=True))
        return outputs

    def _advance(self, req: Request, token: int, raw: RawLogprobs | None) -> RequestOutput:
        if req.logits_mask is not None:
            req.logits_mask.accept(token)
        req.append_token(token)
        if req.timeline.first_token_ns is None:
            req.timeline.first_token_ns = time.time_ns()
            self.stats.prompt_tokens += req.num_prompt_tokens
            self.stats.cached_prompt_tokens += req.num_cached_tokens or 0
        params = req.sampling
        raw_logprobs = (raw,) if raw is not None else ()
        reason: FinishReason | None = None
        if (token in self.eos_token_ids and not params.ignore_eos) or (
                token in params.stop_token_ids):
            # The sampler keeps these tokens out until min_tokens have been generated.
            reason, req.stop_reason = FinishReason.STOP, token
        if reason is None and req.num_tokens >= req.max_total_tokens:
            # A constrained output that is complete at its last token stopped, not cut.
            mask = req.logits_mask
            reason = (FinishReason.STOP if mask is not None and getattr(mask, "is_accepting", False)
                      else FinishReason.LENGTH)
        if reason is None:
            return RequestOutput(req.parent_id, req.index, (token,), "",
                                 raw_logprobs=raw_logprobs, pending=req.output_state)
        self.scheduler.finish_request(req, reason)
        return self._final(req, (token,), raw_logprobs)

    def _final(self, req: Request, token_ids: tuple[int, ...],
               raw_logprobs: tuple[RawLogprobs, ...] = ()) -> RequestOutput:
        if req.finish_reason is None:
            req.finish_reason = FinishReason.ABORT
        timeline = req.timeline
        timeline.finished_ns = time.time_ns()
        timeline.num_preemptions = req.num_preemptions
        forced = (req.finish_reason is FinishReason.STOP and req.logits_mask is not None
                  and getattr(req.logits_mask, "forced_close", False))
        if forced:
            self.stats.structured_forced_closes += 1
        out = RequestOutput(
            req.parent_id, req.index, token_ids, "",
            finish_reason=req.finish_reason, stop_reason=req.stop_reason,
            usage=Usage(req.num_prompt_tokens, req.num_cached_tokens or 0, req.num_output_tokens),
            timeline=timeline, forced_close=forced, raw_logprobs=raw_logprobs,
            pending=req.output_state)
        # Every sequence ends here, and its final output is the last to need its output
        # state. The state reads the request, so the request must let go of it: a request
        # and its state in a cycle outlive the request until the garbage collector's next
        # full pass, and a busy worker's memory swelled by every finished prompt until then.
        req.output_state = None
        return out

    def _fail(self, req: Request, error: str = "the engine failed to run this request", *,
              caused_by_request: bool = False) -> RequestOutput:
        if not req.is_finished:
            self.scheduler.finish_request(req, FinishReason.ERROR)
        req.finish_reason = FinishReason.ERROR
        out = self._final(req, ())
        return RequestOutput(out.request_id, out.index, (), "", (), FinishReason.ERROR,
                             None, out.usage, error=error, timeline=out.timeline,
                             caused_by_request=caused_by_request, pending=out.pending)


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The engine's ids of a request's n sequences: ``A``, ``A#1``, ``A#2``, ..."""
    return [request_id if index == 0 else f"{request_id}#{index}" for index in range(n)]


def grammar_source(sampling: SamplingParams) -> str:
    assert sampling.grammar is not None
    return "tools" if sampling.grammar.WhichOneof("kind") == "tool_calls" else "response_format"
