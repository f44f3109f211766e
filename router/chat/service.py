"""The chat-completions service: a validated request in; a response, or an open stream of
worker deltas, out.

One request's path: checks that need no worker (model id) -> the grammar spec (structured
output, tools; router/tools/grammar_spec.py) -> chat template (with our tools fallback,
router/tools/prompt.py) + tokenize -> choose a worker -> check the context window against that
worker's ``max_model_len`` -> ``to_generate_request`` (the one pydantic -> proto converter) ->
gRPC Generate -> wait for the first delta. Tool calls are parsed out of the text on the way
back (router/tools/parser.py).

Retry: a worker that fails before anything reached the client (``WorkerUnavailable``: it
died, timed out before its first delta, or ended the request with "abort"/"error") is
replaced once by another worker, the policy's next best; the pool's circuit breaker counts
the failure and keeps a worker that keeps failing out of routing for a while. For streams
that means before the first delta arrives (the HTTP response starts only then, so every error
before it still gets its own status); a non-streaming response reaches the client only when
complete, so it is retried after a failure at any point.

Context window (API.md: clamp or reject, never crash): a prompt that leaves no room for one
completion token is 400 ``context_length_exceeded`` (param ``messages``); an explicit
``max_tokens``/``max_completion_tokens`` larger than the room left is rejected the same way
(param: that field), because silently returning fewer tokens than asked would look like a
normal "length" finish; an unset one is clamped to the room left.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from core.errors import (
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    WorkerUnavailable,
)
from core.pb.electron.v1 import worker_pb2 as pb
from router.fleet.client import GenerateStream, WorkerInfo
from router.fleet.pool import Lease, WorkerPool
from router.openai.schemas import ChatCompletionRequest
from router.telemetry import observe
from router.tools.grammar_spec import ToolUse, encode, grammar_spec, tool_use
from router.tools.parser import parse_all
from router.tools.prompt import template_inputs

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first worker, and one other
# Rendering and tokenizing this much text takes milliseconds: do it off the event loop.
OFFLOAD_TOKENIZE_CHARS = 20_000
# OpenAI's stand-in for "very unlikely" (JSON has no -inf; orjson would write null).
MIN_LOGPROB = -9999.0
# top_p 0 (allowed by OpenAI) keeps only the likeliest token; the wire reads 0 as "unset",
# and any positive top_p keeps at least the likeliest token, so the smallest one does that.
_TOP_P_ONLY_LIKELIEST = 1e-9
_FINISH_REASONS = {"stop": "stop", "length": "length"}
# Worker finish reasons meaning "this worker did not finish it": retryable.
_WORKER_GAVE_UP = frozenset({"abort", "error"})


def system_fingerprint(model: str) -> str:
    return "fp_" + xxhash.xxh3_64_hexdigest(model.encode())[:10]


@dataclass
class Meter:
    """What one request has used so far, for the usage ledger: every delta the client is
    sent passes ``observe``. A retry on another worker starts it again (``start``)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    started: bool = False    # a worker's first delta arrived: the prompt was computed
    choices_left: int = 0

    def start(self, prompt_tokens: int, n: int) -> None:
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = prompt_tokens, 0, 0
        self.started, self.choices_left = True, n

    def observe(self, message: pb.GenerateResponse) -> None:
        self.completion_tokens += len(message.token_ids)
        if message.finish_reason and message.finish_reason not in _WORKER_GAVE_UP:
            self.choices_left -= 1
            self.cached_tokens = min(self.prompt_tokens,
                                     max(self.cached_tokens, message.usage.cached_tokens))

    @property
    def finished(self) -> bool:
        return self.started and self.choices_left <= 0


@dataclass(frozen=True)
class TenantTerms:
    """What the tenant's plan adds to a request (router.tenancy.admission builds it)."""

    priority: int = 0                 # the wire's: higher first
    cache_salt: str = ""              # the tenant's salt, mixed into every block hash
    max_context: int | None = None    # the plan's cap on prompt + completion tokens
    pool: str | None = None           # the tenant's worker pool (None: the shared pool)
    meter: Meter = field(default_factory=Meter)


def effective_cache_salt(req: ChatCompletionRequest, terms: TenantTerms | None) -> str:
    """The tenant's salt, then the request's own: a client's ``cache_salt`` can narrow its
    tenant's cache sharing but never reach another tenant's (tenant salts hold no '|')."""
    if terms is None or not terms.cache_salt:
        return req.cache_salt or ""
    return terms.cache_salt + "|" + (req.cache_salt or "")


@dataclass(frozen=True)
class Prepared:
    """A request ready to send to any worker."""

    request: ChatCompletionRequest
    request_id: str       # the X-Request-Id (logs)
    completion_id: str    # "chatcmpl-…": the response id and the worker's request id
    created: int
    model: str
    prompt_token_ids: list[int]
    grammar: str | None = None      # the grammar spec's JSON (router/tools/grammar_spec.py)
    tools: ToolUse | None = None    # set: the output is parsed for tool calls
    terms: TenantTerms | None = None
    pool: str | None = None  # the tenant's worker pool (None: the shared pool)

    @property
    def n(self) -> int:
        return self.request.n or 1


def to_generate_request(req: ChatCompletionRequest, *, request_id: str,
                        prompt_token_ids: Sequence[int], max_tokens: int,
                        model: str, grammar: str | None = None,
                        terms: TenantTerms | None = None) -> pb.GenerateRequest:
    """The wire request. Every sampling field is set explicitly: proto3 reads an unset scalar
    as 0, and temperature 0 means greedy."""
    if req.top_p is None:
        top_p = 1.0
    else:
        top_p = req.top_p or _TOP_P_ONLY_LIKELIEST
    sampling = pb.SamplingParams(
        n=req.n or 1,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=top_p,
        top_k=max(req.top_k or 0, 0),  # vLLM's -1 and 0 both disable it
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=req.logit_bias or {},
        stop=req.stop or (),
        stop_token_ids=req.stop_token_ids or (),
        ignore_eos=bool(req.ignore_eos),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )
    if req.seed is not None:
        sampling.seed = req.seed % 2**64  # OpenAI seeds are int64; the wire's are uint64
    if grammar is not None:
        sampling.grammar = grammar
    return pb.GenerateRequest(
        request_id=request_id, token_ids=prompt_token_ids, sampling=sampling,
        cache_salt=effective_cache_salt(req, terms),
        # A tenant's requests carry its plan's priority (a client cannot raise its own);
        # without tenancy the request's priority is vLLM's (lower first), the wire's is
        # higher first.
        priority=terms.priority if terms is not None else -(req.priority or 0),
        model=model)


def completion_budget(req: ChatCompletionRequest, num_prompt_tokens: int,
                      max_model_len: int) -> int:
    """How many tokens the completion may have (see the module docstring)."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"messages resulted in {num_prompt_tokens} tokens. Please reduce the length of the "
            "messages.", param="messages")
    limit, param = req.completion_limit
    if limit is None:
        budget = room
    elif limit > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + limit} tokens ({num_prompt_tokens} in the "
            f"messages, {limit} in the completion). Please reduce the length of the messages "
            f"or completion.", param=param)
    else:
        budget = limit
    if req.min_tokens and req.min_tokens > budget:
        raise InvalidRequest(f"min_tokens ({req.min_tokens}) exceeds the {budget} completion "
                             "tokens this request can have", param="min_tokens")
    return budget


def _check_token_ids(req: ChatCompletionRequest, vocab_size: int) -> None:
    for param, ids in (("logit_bias", req.logit_bias or ()),
                       ("stop_token_ids", req.stop_token_ids or ())):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidRequest(f"{param} holds token id {bad[0]}, outside this model's "
                                 f"vocabulary of {vocab_size} tokens", param=param)


def finish_reason_of(raw: str) -> str:
    reason = _FINISH_REASONS.get(raw)
    if reason is None:
        raise InternalError(f"the worker sent an unknown finish reason {raw!r}")
    return reason


def _logprob(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN and -inf


def logprob_entries(positions: Sequence[pb.PositionLogprobs], top: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries of some generated tokens."""
    return [{
        "token": p.chosen.token,
        "logprob": _logprob(p.chosen.logprob),
        "bytes": list(p.chosen.bytes),
        "top_logprobs": [{"token": t.token, "logprob": _logprob(t.logprob),
                          "bytes": list(t.bytes)} for t in p.top[:top]],
    } for p in positions]


@dataclass
class UsageTotals:
    """Usage over a request's n sequences: the prompt counts once; the worker reports the
    cached part on a sequence's final delta (once, or once per sequence: the maximum is the
    same either way); completion tokens add up."""

    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: pb.Usage) -> None:
        self.cached_tokens = min(self.prompt_tokens, max(self.cached_tokens,
                                                         usage.cached_tokens))
        self.completion_tokens += usage.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }


@dataclass(eq=False)
class Generation:
    """An open Generate call whose first delta has arrived. ``close()`` (idempotent) cancels
    the call if it still runs (the worker aborts) and releases the worker."""

    prepared: Prepared
    lease: Lease
    stream: GenerateStream
    first: pb.GenerateResponse
    _closed: bool = field(default=False, repr=False)

    async def responses(self) -> AsyncIterator[pb.GenerateResponse]:
        """Every delta; WorkerUnavailable when the worker gives the request up."""
        terms = self.prepared.terms
        yield _checked(self.first, self.lease.worker.worker_id)
        async for message in self.stream:
            if terms is not None:  # the first delta was counted when it arrived
                terms.meter.observe(message)
            yield _checked(message, self.lease.worker.worker_id)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.cancel()
            self.lease.release()


def assistant_message(tools: ToolUse | None, text: str, finish: str | None) -> dict[str, Any]:
    """A choice's ``message`` and ``finish_reason``, its tool calls parsed out when tools are
    in use."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tools is None:
        return {"message": message, "finish_reason": finish}
    content, calls = parse_all(text, tools.names)
    if not calls:
        message["content"] = content
        return {"message": message, "finish_reason": finish}
    message["content"] = content or None
    message["tool_calls"] = [call.as_openai() for call in calls]
    return {"message": message, "finish_reason": tool_calls_finish(finish)}


def tool_calls_finish(finish: str | None) -> str | None:
    """A choice that made calls and stopped by itself finished for ``tool_calls``."""
    return "tool_calls" if finish == "stop" else finish


def _checked(message: pb.GenerateResponse, worker_id: str) -> pb.GenerateResponse:
    if message.finish_reason in _WORKER_GAVE_UP:
        raise WorkerUnavailable(f"worker {worker_id} ended the request: {message.finish_reason}")
    return message


@dataclass
class _Attempts:
    tried: list[str] = field(default_factory=list)
    last_error: WorkerUnavailable | None = None

    @property
    def left(self) -> bool:
        return len(self.tried) < MAX_ATTEMPTS


class ChatService:
    def __init__(self, *, pool: WorkerPool, tokenizer: Any, model_id: str,
                 first_token_timeout_s: float, fingerprint: str):
        """``tokenizer`` is a ``core.tokenizer.Tokenizer`` (encode_chat, supports_tools)."""
        self._pool = pool
        self._tokenizer = tokenizer
        self.model_id = model_id
        self._first_token_timeout_s = first_token_timeout_s
        self.fingerprint = fingerprint

    async def prepare(self, req: ChatCompletionRequest, request_id: str,
                      terms: TenantTerms | None = None) -> Prepared:
        if req.model != self.model_id:
            raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have "
                                "access to it.", param="model")
        tools = tool_use(req)
        grammar = encode(grammar_spec(req, tools))
        messages, template_tools = template_inputs(
            req, tools, template_supports_tools=self._tokenizer.supports_tools)
        size = sum(len(m["content"] or "") for m in messages)
        with observe.span("tokenize") as span:
            if size > OFFLOAD_TOKENIZE_CHARS:
                ids = await asyncio.to_thread(self._tokenizer.encode_chat, messages, template_tools)
            else:
                ids = self._tokenizer.encode_chat(messages, template_tools)
            if span is not None:
                span.set_attribute("gen_ai.usage.input_tokens", len(ids))
        return Prepared(request=req, request_id=request_id,
                        completion_id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()),
                        model=self.model_id, prompt_token_ids=ids, grammar=grammar, tools=tools,
                        terms=terms, pool=terms.pool if terms is not None else None)


    async def start_stream(self, req: ChatCompletionRequest, request_id: str,
                           terms: TenantTerms | None = None) -> Generation:
        """An open generation whose first delta has arrived (the caller must ``close()`` it)."""
        return await self._open(await self.prepare(req, request_id, terms), _Attempts())

    async def complete(self, req: ChatCompletionRequest, request_id: str,
                       terms: TenantTerms | None = None) -> dict[str, Any]:
        """The whole non-streaming response body."""
        prepared = await self.prepare(req, request_id, terms)
        attempts = _Attempts()
        while True:
            generation = await self._open(prepared, attempts)
            try:
                return await self._collect(generation)
            except WorkerUnavailable as exc:
                generation.lease.failed()
                if not attempts.left:
                    raise
                attempts.last_error = exc
                log.warning("request %s: %s; retrying on another worker", request_id,
                            exc.message)
            finally:
                generation.close()

    async def _open(self, prepared: Prepared, attempts: _Attempts) -> Generation:
        req = prepared.request
        text = ""
        if self._pool.policy.uses_text:
            text = " ".join(m.content for m in req.messages if isinstance(m.content, str))
        info = self._pool.request_info(prepared.completion_id, prepared.prompt_token_ids,
                                       cache_salt=effective_cache_salt(req, prepared.terms),
                                       text=text)
        while True:
            try:
                lease = self._pool.acquire(info, exclude=attempts.tried, pool=prepared.pool)
            except WorkerUnavailable:
                if attempts.last_error is not None:  # nowhere else to retry
                    raise attempts.last_error from None
                raise
            attempts.tried.append(lease.worker.worker_id)
            stream: GenerateStream | None = None
            try:
                worker_info = lease.worker.info
                assert worker_info is not None  # the pool routes only to connected workers
                request = self._wire_request(prepared, worker_info)
                log.debug("request %s -> worker %s (%s)", prepared.request_id,
                          lease.worker.worker_id, lease.reason)
                stream = await lease.worker.generate(request)
                first = await self._first_delta(stream, lease.worker.worker_id)
                lease.started()
                if prepared.terms is not None:
                    prepared.terms.meter.start(len(prepared.prompt_token_ids), prepared.n)
                    prepared.terms.meter.observe(first)
                return Generation(prepared, lease, stream, first)
            except WorkerUnavailable as exc:
                lease.failed()
                self._abandon(stream, lease)
                if not attempts.left:
                    raise
                attempts.last_error = exc
                log.warning("request %s: %s; retrying on another worker",
                            prepared.request_id, exc.message)
            except BaseException:
                self._abandon(stream, lease)
                raise

    @staticmethod
    def _abandon(stream: GenerateStream | None, lease: Lease) -> None:
        if stream is not None:
            stream.cancel()
        lease.release()

    def _wire_request(self, prepared: Prepared, worker: WorkerInfo) -> pb.GenerateRequest:
        req = prepared.request
        _check_token_ids(req, worker.vocab_size)
        max_model_len = worker.max_model_len
        if prepared.terms is not None and prepared.terms.max_context is not None:
            max_model_len = min(max_model_len, prepared.terms.max_context)
        budget = completion_budget(req, len(prepared.prompt_token_ids), max_model_len)
        return to_generate_request(req, request_id=prepared.completion_id,
                                   prompt_token_ids=prepared.prompt_token_ids,
                                   max_tokens=budget, model=self.model_id,
                                   grammar=prepared.grammar, terms=prepared.terms)

    async def _first_delta(self, stream: GenerateStream, worker_id: str) -> pb.GenerateResponse:
        try:
            async with asyncio.timeout(self._first_token_timeout_s):
                first = await anext(stream)
        except TimeoutError:
            raise WorkerUnavailable(f"worker {worker_id} sent nothing within "
                                    f"{self._first_token_timeout_s:g} s") from None
        except StopAsyncIteration:
            raise WorkerUnavailable(f"worker {worker_id} ended the call without output") \
                from None
        return _checked(first, worker_id)

    async def _collect(self, generation: Generation) -> dict[str, Any]:
        prepared = generation.prepared
        req, n = prepared.request, prepared.n
        top = req.top_logprobs or 0
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        usage = UsageTotals(len(prepared.prompt_token_ids))
        async for message in generation.responses():
            i = message.index
            if not 0 <= i < n:
                raise InternalError(f"the worker sent choice index {i} for n={n}")
            texts[i].append(message.text)
            if req.logprobs:
                logprobs[i].extend(logprob_entries(message.logprobs, top))
            if message.finish_reason:
                finish[i] = finish_reason_of(message.finish_reason)
                usage.add(message.usage)
        if None in finish:
            raise WorkerUnavailable("the worker's stream ended before every choice finished")
        return {
            "id": prepared.completion_id,
            "object": "chat.completion",
            "created": prepared.created,
            "model": prepared.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{
                "index": i,
                **assistant_message(prepared.tools, "".join(texts[i]), finish[i]),
                "logprobs": {"content": logprobs[i], "refusal": None} if req.logprobs else None,
            } for i in range(n)],
            "usage": usage.as_dict(),
        }
