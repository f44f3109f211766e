"""The client's side of a response in progress: SSE framing and disconnect watching.

Framing (docs/api.md, "Streaming"): each event is ``data: <json>\\n\\n`` and the stream ends with
``data: [DONE]\\n\\n``. A choice's first chunk carries ``delta.role``; its last one is
``{"index": i, "delta": {}, "finish_reason": …}``. With ``stream_options.include_usage``
every chunk has ``"usage": null`` and one more chunk with ``"choices": []`` and the usage
comes before ``[DONE]``. An error after the stream started is one ``data: {"error": …}``
event, then ``[DONE]``.

Chunk payloads are built in ``router/chat/chunks.py`` (tool calls included).

A client that disconnects cancels the work in progress, and the worker aborts the request:
one ``DisconnectWatch`` per request watches for it while the response is prepared, built
whole or streamed (``EventStreamResponse``). So does a stream's client that reads nothing for
``router.client_write_timeout_s``: the write waiting for its socket is given up, the stream
aborted, billed for the tokens written, and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from core.errors import ElectronError, InternalError
from router.chat.chunks import ChunkStream
from router.chat.service import Generation
from router.openai.errors import GENERIC_500, body_of

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
# Status recorded for a request whose client left before the response (nothing is sent).
CLIENT_CLOSED_REQUEST = 499


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def chat_chunks(generation: Generation, fingerprint: str) -> AsyncIterator[bytes]:
    """The SSE events of one streamed chat completion. Closed before its end (the client
    left or stopped reading), the completion tokens it had read but not yet seen written are
    taken off the request's usage: it is billed for what was sent."""
    prepared = generation.prepared
    usage = generation.usage
    chunks = ChunkStream(prepared, usage, fingerprint)
    out = b""
    sent = 0  # completion tokens in what was written (each yield returns once it was)
    try:
        try:
            async for message in generation.responses():
                out += b"".join(event(chunk) for chunk in chunks.add(message))
                # One write for what is ready together: the deltas already here, and the last
                # choice's finish with the usage chunk and [DONE] (its end came with it).
                if out and not generation.ready and not chunks.finished:
                    yield out
                    sent = usage.completion_tokens
                    out = b""
            tail = out + b"".join(event(chunk) for chunk in chunks.end())
        except ElectronError as exc:
            log.warning("request %s failed while streaming: %s", prepared.request_id,
                        exc.message)
            tail = out + event(body_of(exc))
        except Exception as exc:
            log.error("request %s: unhandled %s while streaming", prepared.request_id,
                      type(exc).__name__, exc_info=exc)
            tail = out + event(body_of(InternalError(GENERIC_500)))
        # The usage (or error) event, [DONE] and the end of the body leave in one write.
        yield tail + DONE
        sent = usage.completion_tokens
    except BaseException:  # closed or cancelled at a write (or while reading the worker)
        usage.unsent(usage.completion_tokens - sent)
        raise


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected while a ``DisconnectWatch.guard`` block ran."""


class ClientStalled(Exception):
    """A write waited ``client_write_timeout_s`` for a client that reads nothing."""


class DisconnectWatch:
    """Watches one request's ``receive`` for ``http.disconnect``, in one task for the whole
    response (waiting for the first delta, then streaming). A block run under ``guard()`` is
    cancelled when the client leaves and raises ``ClientGone``; it runs in the caller's own
    task, so no phase costs a task, an ``asyncio.wait`` and a gather of its own (~17 us each,
    measured). ``close()`` once the response is over."""

    def __init__(self, receive: Receive):
        self.gone = False
        self._guarded: asyncio.Task[Any] | None = None
        self._cancelled: BaseException | None = None  # what the guarded block will raise
        self._task = asyncio.ensure_future(_until_disconnect(receive))
        self._task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self.gone = True
        self.interrupt(ClientGone())

    def interrupt(self, error: BaseException) -> None:
        """Cancels the guarded block, if one runs, which then raises ``error``."""
        if self._guarded is not None and self._cancelled is None:
            # The guarded task is suspended inside its block: the cancellation lands there.
            self._cancelled = error
            self._guarded.cancel()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self.gone:
            raise ClientGone
        task = asyncio.current_task()
        assert task is not None
        self._guarded = task
        try:
            yield
        except asyncio.CancelledError:
            error, self._cancelled = self._cancelled, None
            if error is None:
                raise  # cancelled by someone else: the router is stopping
            task.uncancel()
            raise error from None
        finally:
            self._guarded = None

    def close(self) -> None:
        self._task.cancel()


class EventStreamResponse(StreamingResponse):
    """An SSE response that stops producing when the client disconnects or reads nothing
    for ``write_timeout_s`` (a write waits that long: the socket's buffers are full), and
    always calls ``on_close`` (which cancels the worker's generation) when it ends, however
    it ends: with "incomplete" when the client stopped reading, else None (the request's own
    outcome). A stream cut for a stalled client returns without completing the response, so
    the server closes the connection."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[str | None], None],
                 watch: DisconnectWatch, write_timeout_s: float):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close
        self._watch = watch
        self._write_timeout_s = write_timeout_s
        self._started = False
        self._writing_since: float | None = None  # loop time the pending write began
        self._timer: asyncio.TimerHandle | None = None  # the write timer (_check_write)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stalled = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self._write_timeout_s, self._check_write)
        try:
            with self._watch.guard():
                await self._pump(send)
        except ClientGone:
            if not self._started:  # gone before the stream began: recorded as such
                await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST,
                            "headers": []})
        except ClientStalled:
            stalled = True
        except OSError:  # the client went away mid-write
            pass
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._watch.close()
            # The generator may be parked at a ``yield`` if the cancel hit ``send``.
            await self._events.aclose()  # type: ignore[attr-defined]
            self._on_close("incomplete" if stalled else None)
        if stalled:
            log.warning("a stream's client read nothing for %g s: aborted "
                        "(router.client_write_timeout_s)", self._write_timeout_s)

    async def _pump(self, send: Send) -> None:
        self._started = True
        await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
        last = False
        # Each event is read after the previous one was written: the generator learns what
        # reached the client (it ends after its last event).
        async for data in self._events:
            last = data.endswith(DONE)
            await self._send(send, {"type": "http.response.body", "body": data,
                                    "more_body": not last})
        if not last:
            await self._send(send, {"type": "http.response.body", "body": b"",
                                    "more_body": False})

    async def _send(self, send: Send, message: Message) -> None:
        # A write only waits when the socket's buffers are full; one timer per stream
        # (``_check_write``) instead of an ``asyncio.timeout`` per write (~4 us each).
        self._writing_since = asyncio.get_running_loop().time()
        await send(message)
        self._writing_since = None

    def _check_write(self) -> None:
        """The write timer: a write waiting ``write_timeout_s`` aborts the stream; else it is
        armed again for the current write's deadline, or a period from now."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        since = self._writing_since
        if since is not None and now - since >= self._write_timeout_s:
            self._timer = None
            self._watch.interrupt(ClientStalled())
            return
        due = (since if since is not None else now) + self._write_timeout_s
        self._timer = loop.call_at(due, self._check_write)
