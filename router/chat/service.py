"""The chat-completions service: a validated request in; a response, or an open stream of
worker deltas, out. The request's lifecycle (admission to last byte) is lifecycle.py's.

One request's path (``prepare``): checks that need no worker (model id) -> the grammar spec
(structured output, tools; router/tools/grammar_spec.py) -> chat template (with our tools
fallback, router/tools/prompt.py) + tokenize -> the context window and the vocabulary,
checked against the model's limits as the pool's workers report them (wire.py) -> the wire
request, built once (``to_generate_request``). Then (``_open``): choose a worker -> gRPC
Generate -> wait for the first delta. Tool calls are parsed out of the text on the way back
(response.py, chunks.py).

Liveness: a worker that has nothing to send yet sends progress messages (queued, its place
in the queue; or computing a long prompt), which carry no output and are never passed on.
Only silence counts against a worker: nothing at all, not even progress, for
``first_token_timeout_s`` before the first delta (then it is a failure, retried below), or for
``stream_stall_timeout_s`` between deltas (then the stream ends with an error event, the call
is cancelled, so the worker aborts the request, and the lease and the slot are released). A
request merely queued behind others is neither retried nor counted against its worker.

Retry: a worker that fails before anything reached the client (``WorkerUnavailable``: it
died, was silent before its first delta, or ended the request with "abort"/"error") is
replaced once by another worker, the policy's next best; the pool's circuit breaker counts
the failure and keeps a worker that keeps failing out of routing for a while. For streams
that means before the first delta arrives (the HTTP response starts only then, so every error
before it still gets its own status); a non-streaming response reaches the client only when
complete, so it is retried after a failure at any point. An error the request itself
caused (the worker's ``INVALID_ARGUMENT``: bad input, or a request the worker could not
sample, which fails alone without its batch) is never retried and never counted against the
worker: it is not ``WorkerUnavailable``, and the lease is released with no verdict.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.config import RouterConfig
from core.errors import ElectronError, InternalError, ModelNotFound, WorkerUnavailable
from core.pb.electron.v1 import worker_pb2 as pb
from core.protocol import WORKER_GAVE_UP
from router.chat.response import (
    assistant_message,
    finish_reason_of,
    logprob_entries,
    usage_body,
)
from router.chat.usage import Usage
from router.chat.wire import (
    check_buffered_size,
    check_token_ids,
    completion_budget,
    effective_cache_salt,
    to_generate_request,
)
from router.fleet.client import GenerateStream
from router.fleet.pool import Lease, WorkerPool
from router.openai.schemas import ChatCompletionRequest
from router.telemetry import observe
from router.tenancy.terms import TenantTerms
from router.tools.grammar_spec import ToolUse, grammar_spec, tool_use
from router.tools.prompt import template_inputs

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first worker, and one other
# Rendering and tokenizing this much text takes milliseconds: do it off the event loop.
OFFLOAD_TOKENIZE_CHARS = 20_000


@dataclass(frozen=True)
class Prepared:
    """A request ready to send to any worker."""

    request: ChatCompletionRequest
    request_id: str       # the X-Request-Id (logs)
    completion_id: str    # "chatcmpl-…": the response id and the worker's request id
    created: int
    model: str
    prompt_token_ids: list[int]
    wire: pb.GenerateRequest        # what every worker tried is sent
    tools: ToolUse | None = None    # set: the output is parsed for tool calls
    terms: TenantTerms | None = None
    pool: str | None = None  # the tenant's worker pool (None: the shared pool)

    @property
    def n(self) -> int:
        return self.request.n or 1

    @property
    def token_budget(self) -> int:
        """The most tokens it can use: its prompt and n completions of max tokens."""
        return len(self.prompt_token_ids) + self.n * self.wire.sampling.max_tokens


@dataclass(eq=False)
class Generation:
    """An open Generate call whose first delta has arrived. ``close()`` (idempotent) cancels
    the call if it still runs (the worker aborts) and releases the worker."""

    prepared: Prepared
    lease: Lease
    stream: GenerateStream
    first: pb.GenerateResponse
    usage: Usage  # every delta is counted here as it passes
    _closed: bool = field(default=False, repr=False)

    async def responses(self) -> AsyncIterator[pb.GenerateResponse]:
        """Every delta; WorkerUnavailable when the worker gives the request up or falls
        silent for the stall limit (``GenerateStream.watch_silence``)."""
        worker_id = self.lease.worker.worker_id
        yield _checked(self.first, worker_id)
        while True:
            try:
                message = await next_delta(self.stream)
            except StopAsyncIteration:
                return
            self.usage.observe(message)  # the first delta was counted when it arrived
            yield _checked(message, worker_id)

    @property
    def ready(self) -> bool:
        """More deltas have arrived: reading the next one will not wait."""
        return self.stream.ready

    def interrupt(self, error: ElectronError) -> None:
        """Ends the stream early with ``error`` (the reader sees it after the deltas already
        here); the worker aborts the request. ``close`` still releases the worker."""
        self.stream.interrupt(error)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.cancel()
            self.lease.release()


async def next_delta(stream: GenerateStream) -> pb.GenerateResponse:
    """The stream's next delta, skipping progress messages (silence is the stream's own
    watch: ``GenerateStream.watch_silence``). StopAsyncIteration at the end of the stream."""
    while True:
        message = await anext(stream)
        if not message.HasField("progress"):
            return message


def _checked(message: pb.GenerateResponse, worker_id: str) -> pb.GenerateResponse:
    if message.finish_reason in WORKER_GAVE_UP:
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
    def __init__(self, *, pool: WorkerPool, tokenizer: Any, settings: RouterConfig,
                 fingerprint: str):
        """``tokenizer`` is a ``core.tokenizer.Tokenizer`` (encode_chat, supports_tools);
        ``settings`` the router's (model id, first-token timeout, buffered-response bound)."""
        self._pool = pool
        self._tokenizer = tokenizer
        self.model_id = settings.model_id
        self._first_token_timeout_s = settings.first_token_timeout_s
        self._stream_stall_timeout_s = settings.stream_stall_timeout_s
        self._max_buffered_tokens = settings.max_buffered_tokens
        self.fingerprint = fingerprint

    def served_model(self, model: str) -> str:
        """The served model id a request names, or ``ModelNotFound`` (404); the handler asks
        before admission, so an unknown model is never admitted nor billed."""
        if model != self.model_id:
            shown = model if len(model) <= 256 else model[:256] + "…"
            raise ModelNotFound(f"The model {shown!r} does not exist or you do not have "
                                "access to it.", param="model")
        return self.model_id

    async def prepare(self, req: ChatCompletionRequest, request_id: str,
                      terms: TenantTerms | None = None) -> Prepared:
        self.served_model(req.model)
        tools = tool_use(req)
        grammar = grammar_spec(req, tools)
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
        pool = terms.pool if terms is not None else None
        # Checked before a worker is reserved: every worker of a pool serves the same model.
        max_model_len, vocab_size = self._pool.model_limits(pool)
        check_token_ids(req, vocab_size)
        if terms is not None and terms.max_context is not None:
            max_model_len = min(max_model_len, terms.max_context)
        budget = completion_budget(req, len(ids), max_model_len)
        if not req.stream:
            check_buffered_size(req, budget, self._max_buffered_tokens)
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        wire = to_generate_request(req, request_id=completion_id, prompt_token_ids=ids,
                                   max_tokens=budget, model=self.model_id, grammar=grammar,
                                   terms=terms)
        return Prepared(request=req, request_id=request_id, completion_id=completion_id,
                        created=int(time.time()), model=self.model_id, prompt_token_ids=ids,
                        wire=wire, tools=tools, terms=terms, pool=pool)

    async def start_stream(self, prepared: Prepared, usage: Usage) -> Generation:
        """An open generation whose first delta has arrived (the caller must ``close()`` it)."""
        return await self._open(prepared, usage, _Attempts())

    async def complete(self, prepared: Prepared, usage: Usage) -> dict[str, Any]:
        """The whole non-streaming response body."""
        attempts = _Attempts()
        while True:
            generation = await self._open(prepared, usage, attempts)
            try:
                return await self._collect(generation)
            except WorkerUnavailable as exc:
                generation.lease.failed()
                if not attempts.left:
                    raise
                attempts.last_error = exc
                log.warning("request %s: %s; retrying on another worker",
                            prepared.request_id, exc.message)
            finally:
                generation.close()

    async def _open(self, prepared: Prepared, usage: Usage, attempts: _Attempts) -> Generation:
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
                log.debug("request %s -> worker %s (%s)", prepared.request_id,
                          lease.worker.worker_id, lease.reason)
                usage.dispatch(len(prepared.prompt_token_ids))
                stream = await lease.worker.generate(prepared.wire)
                worker_id = lease.worker.worker_id
                stream.watch_silence(self._first_token_timeout_s, f"worker {worker_id} is silent")
                first = await self._first_delta(stream, worker_id)
                stream.watch_silence(self._stream_stall_timeout_s, f"worker {worker_id} stalled")
                lease.started()
                usage.start(len(prepared.prompt_token_ids), prepared.n)
                usage.observe(first)
                return Generation(prepared, lease, stream, first, usage)
            except WorkerUnavailable as exc:
                usage.withdraw()
                lease.failed()
                self._abandon(stream, lease)
                if not attempts.left:
                    raise
                attempts.last_error = exc
                log.warning("request %s: %s; retrying on another worker",
                            prepared.request_id, exc.message)
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    # The worker refused it (or the router failed): no prefill to bill. A
                    # cancellation is the client leaving: the prompt sent is billed.
                    usage.withdraw()
                self._abandon(stream, lease)
                raise

    @staticmethod
    def _abandon(stream: GenerateStream | None, lease: Lease) -> None:
        if stream is not None:
            stream.cancel()
        lease.release()

    async def _first_delta(self, stream: GenerateStream, worker_id: str) -> pb.GenerateResponse:
        try:
            first = await next_delta(stream)
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
        async for message in generation.responses():
            i = message.index
            if not 0 <= i < n:
                raise InternalError(f"the worker sent choice index {i} for n={n}")
            texts[i].append(message.text)
            if req.logprobs:
                logprobs[i].extend(logprob_entries(message.logprobs, top))
            if message.finish_reason:
                finish[i] = finish_reason_of(message.finish_reason)
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
            "usage": usage_body(generation.usage),
        }
