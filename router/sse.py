"""The client's side of a response in progress: SSE framing and disconnect watching.

Framing (API.md): each event is ``data: <json>\\n\\n`` and the stream ends with
``data: [DONE]\\n\\n``. A choice's first chunk carries ``delta.role``; its last one is
``{"index": i, "delta": {}, "finish_reason": …}``. With ``stream_options.include_usage``
every chunk has ``"usage": null`` and one more chunk with ``"choices": []`` and the usage
comes before ``[DONE]``. An error after the stream started is one ``data: {"error": …}``
event, then ``[DONE]``.

Tool calls (when the request uses tools) are parsed from each choice's text as it streams
(``router/tool_parser.py``): content deltas first, then per call one chunk with its index, id,
type, name and ``arguments: ""``, and one with the arguments; such a stream opens with
``content: null``.

A client that disconnects cancels the work in progress: the gRPC call is cancelled and the
worker aborts the request (``EventStreamResponse`` for streams, ``until_disconnected`` for
responses that are built whole).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cluster.errors import ElectronError, InternalError, WorkerUnavailable
from router.chat import (
    Generation,
    UsageTotals,
    finish_reason_of,
    logprob_entries,
    tool_calls_finish,
)
from router.errors import GENERIC_500, body_of
from router.tool_parser import ToolCallParser, stream_deltas

log = logging.getLogger(__name__)

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
# Status recorded for a request whose client left before the response (nothing is sent).
CLIENT_CLOSED_REQUEST = 499


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def chat_chunks(generation: Generation, fingerprint: str) -> AsyncIterator[bytes]:
    """The SSE events of one streamed chat completion."""
    prepared = generation.prepared
    req, n = prepared.request, prepared.n
    top = req.top_logprobs or 0
    base: dict[str, Any] = {"id": prepared.completion_id, "object": "chat.completion.chunk",
                            "created": prepared.created, "model": prepared.model,
                            "system_fingerprint": fingerprint}
    if req.include_usage:
        base["usage"] = None

    def chunk(choice: dict[str, Any]) -> bytes:
        return event({**base, "choices": [choice]})

    started = [False] * n
    finished = 0
    usage = UsageTotals(len(prepared.prompt_token_ids))
    parsers = ([ToolCallParser(prepared.tools.names) for _ in range(n)]
               if prepared.tools is not None else None)
    try:
        async for message in generation.responses():
            i = message.index
            if not 0 <= i < n:
                raise InternalError(f"the worker sent choice index {i} for n={n}")
            logprobs = ({"content": logprob_entries(message.logprobs, top), "refusal": None}
                        if req.logprobs and message.logprobs else None)
            if parsers is None:
                deltas = ([{"content": message.text}]
                          if message.text or logprobs is not None else [])
            else:
                events = parsers[i].feed(message.text)
                if message.finish_reason:
                    events += parsers[i].finish()
                deltas = stream_deltas(events)
            if not started[i]:
                # Tool-call streams open with content null, as a message with calls has it.
                first: dict[str, Any] = {"role": "assistant",
                                         "content": "" if parsers is None else None}
                if deltas and "content" in deltas[0]:
                    first["content"] = deltas.pop(0)["content"]
                deltas.insert(0, first)
                started[i] = True
            if logprobs is not None and not deltas:
                deltas.append({})
            out = b"".join(chunk({"index": i, "delta": delta,
                                  "logprobs": logprobs if k == 0 else None,
                                  "finish_reason": None}) for k, delta in enumerate(deltas))
            if message.finish_reason:
                reason = finish_reason_of(message.finish_reason)
                if parsers is not None and parsers[i].calls:
                    reason = tool_calls_finish(reason)
                out += chunk({"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": reason})
                usage.add(message.usage)
                finished += 1
            if out:
                yield out
        if finished < n:
            raise WorkerUnavailable("the worker's stream ended before every choice finished")
        if req.include_usage:
            yield event({**base, "choices": [], "usage": usage.as_dict()})
    except ElectronError as exc:
        log.warning("request %s failed while streaming: %s", prepared.request_id, exc.message)
        yield event(body_of(exc))
    except Exception as exc:
        log.error("request %s: unhandled %s while streaming", prepared.request_id,
                  type(exc).__name__, exc_info=exc)
        yield event(body_of(InternalError(GENERIC_500)))
    yield DONE


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """An SSE response that stops producing when the client disconnects and always calls
    ``on_close`` (which cancels the worker's generation) when it ends, however it ends."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            # The generator may be parked at a ``yield`` if the cancel hit ``send``.
            await self._events.aclose()  # type: ignore[attr-defined]
            self._on_close()
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            exc = pump.exception()
            if not isinstance(exc, OSError):  # the client went away mid-write
                raise exc  # type: ignore[misc]

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for data in self._events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """Runs ``work`` unless the client disconnects first (then cancels it: None)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()
