"""The client's side of a response in progress: SSE framing and disconnect watching.

Framing (docs/api.md, "Streaming"): each event is ``data: <json>\\n\\n`` and the stream ends with
``data: [DONE]\\n\\n``. A choice's first chunk carries ``delta.role``; its last one is
``{"index": i, "delta": {}, "finish_reason": …}``. With ``stream_options.include_usage``
every chunk has ``"usage": null`` and one more chunk with ``"choices": []`` and the usage
comes before ``[DONE]``. An error after the stream started is one ``data: {"error": …}``
event, then ``[DONE]``.

Chunk payloads are built in ``router/chat/chunks.py`` (tool calls included).

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

from core.errors import ElectronError, InternalError
from router.chat.chunks import ChunkStream
from router.chat.service import Generation
from router.openai.errors import GENERIC_500, body_of

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
    chunks = ChunkStream(prepared, generation.usage, fingerprint)
    out = b""
    try:
        async for message in generation.responses():
            out += b"".join(event(chunk) for chunk in chunks.add(message))
            # One write for what is ready together: the deltas already here, and the last
            # choice's finish with the usage chunk and [DONE] (its end came with it).
            if out and not generation.ready and not chunks.finished:
                yield out
                out = b""
        tail = out + b"".join(event(chunk) for chunk in chunks.end())
    except ElectronError as exc:
        log.warning("request %s failed while streaming: %s", prepared.request_id, exc.message)
        tail = out + event(body_of(exc))
    except Exception as exc:
        log.error("request %s: unhandled %s while streaming", prepared.request_id,
                  type(exc).__name__, exc_info=exc)
        tail = out + event(body_of(InternalError(GENERIC_500)))
    # The usage (or error) event, [DONE] and the end of the body leave in one write.
    yield tail + DONE


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
            last = data.endswith(DONE)
            await send({"type": "http.response.body", "body": data, "more_body": not last})
            if last:
                return
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
