"""One chat request from its admission to its last byte.

``ChatRequest`` owns everything a request holds and must give back, so that each happens
exactly once on every path (done, worker failure, client gone before or during the stream,
validation error after admission, router stop):

- the admission (a concurrency slot, its RPM entry and, once the prompt is tokenized, its
  tokens-per-minute reservation; router/tenancy/admission.py);
- the disconnect race: one ``sse.DisconnectWatch`` for the request; a client that leaves
  before the response starts cancels the work; one that leaves mid-stream, or stops reading
  it for ``router.client_write_timeout_s``, ends the event stream
  (``sse.EventStreamResponse``);
- the generation (the gRPC call and the worker's lease), closed in ``finish``;
- the request's ONE usage count (router/chat/usage.py), fed by the generation as deltas pass
  and read by the response body, the stream's usage chunk, the ledger row, the slot's token
  count and the cached-tokens metric;
- ``finish``: closes the generation, records the cached tokens, releases the slot and writes
  the ledger row, once;
- the router's drain (router/api/drain.py): the request is listed there until ``finish``;
  ``interrupt`` (the drain time is over) ends it with the drain's error: a stream with an
  error event, a request not yet answered with the error response.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive

from router.api import sse
from router.api.drain import Drain, ShuttingDown
from router.chat.response import FORCED_CLOSE_HEADER
from router.chat.service import ChatService, Generation, Prepared
from router.chat.usage import Usage
from router.openai.schemas import ChatCompletionRequest
from router.telemetry import observe
from router.tenancy.admission import Admission


class ChatRequest:
    def __init__(self, chat: ChatService, admission: Admission, request: ChatCompletionRequest,
                 request_id: str, drain: Drain | None = None, *, write_timeout_s: float):
        """``write_timeout_s``: a stream whose client reads nothing this long is aborted."""
        self._chat = chat
        self._drain = drain
        self._write_timeout_s = write_timeout_s
        self.admission = admission
        self.request = request
        self.request_id = request_id
        self.usage = Usage()
        usage = self.usage
        admission.progress = lambda: (usage.billed_prompt_tokens, usage.cached_tokens,
                                      usage.completion_tokens)
        self._generation: Generation | None = None
        self._finished = False
        # Watches the work before the response (the first token, or the whole body).
        self._watch: sse.DisconnectWatch | None = None
        self._interrupted: ShuttingDown | None = None
        if drain is not None:
            drain.add(self)

    async def respond(self, receive: Receive, as_json: Callable[[Any], Response]) -> Response:
        """The HTTP response: an event stream, a JSON body, or 499 when the client left first.
        Every path ends in ``finish`` (the event stream's when it closes)."""
        watch = sse.DisconnectWatch(receive)
        try:
            if self.request.stream:
                with self._answering(watch):
                    generation = await self._start_stream()
                self._generation = generation
                if self._interrupted is not None:
                    generation.interrupt(self._interrupted)
                response: Response = sse.EventStreamResponse(
                    sse.chat_chunks(generation, self._chat.fingerprint), on_close=self.finish,
                    watch=watch, write_timeout_s=self._write_timeout_s)
            else:
                with self._answering(watch):
                    body = await self._complete()
                watch.close()
                self.finish()
                response = as_json(body)
                if self.usage.forced_closes:
                    response.headers[FORCED_CLOSE_HEADER] = str(self.usage.forced_closes)
        except sse.ClientGone:
            watch.close()
            return self._client_left()
        except BaseException:
            watch.close()
            self.finish("error")
            raise
        response.headers.update(self.admission.headers())
        return response

    @contextlib.contextmanager
    def _answering(self, watch: sse.DisconnectWatch) -> Iterator[None]:
        """The work before the response (the first token, or the whole buffered body), which
        the client leaving (``sse.ClientGone``) or the drain's cut (``ShuttingDown``)
        cancels."""
        if self._interrupted is not None:  # cut before it began
            raise self._interrupted
        self._watch = watch
        try:
            with watch.guard():
                yield
        finally:
            self._watch = None

    def interrupt(self, error: ShuttingDown) -> None:
        """The drain time is over: end now with ``error`` (``finish`` follows as usual)."""
        if self._finished or self._interrupted is not None:
            return
        self._interrupted = error
        if self._generation is not None:
            self._generation.interrupt(error)
        elif self._watch is not None:
            self._watch.interrupt(error)

    async def _prepare(self) -> Prepared:
        prepared = await self._chat.prepare(self.request, self.request_id,
                                            self.admission.terms)
        # Its whole budget against the plan's tokens per minute before any work starts;
        # finish settles it to what was used.
        await self.admission.reserve(prepared.token_budget)
        return prepared

    async def _start_stream(self) -> Generation:
        return await self._chat.start_stream(await self._prepare(), self.usage)

    async def _complete(self) -> dict[str, Any]:
        return await self._chat.complete(await self._prepare(), self.usage)

    def _client_left(self) -> Response:
        self.finish("disconnected")
        return Response(status_code=sse.CLIENT_CLOSED_REQUEST)

    def finish(self, status: str | None = None) -> None:
        """Ends the request, once. ``status`` None: "ok" if every choice finished, else
        "incomplete" (the client left mid-stream or stopped reading, or the worker failed)."""
        if self._finished:
            return
        self._finished = True
        if self._drain is not None:
            self._drain.discard(self)
        if self._generation is not None:
            self._generation.close()
        usage = self.usage
        if status is None:
            status = "ok" if usage.finished else "incomplete"
        observe.cached_tokens(usage.cached_tokens)
        self.admission.finish(status, usage.billed_prompt_tokens, usage.cached_tokens,
                              usage.completion_tokens)
