"""The router's limits on HTTP connections: how many, how long one may take to send its
request, how long an idle one is kept, how large a request head may be.

uvicorn has a concurrency limit (``limit_concurrency``: past it, new requests get 503) and a
keep-alive timeout for the idle time *between* requests, but nothing bounds the time a
client takes to send a request: a connection that sends part of a request head and stalls
(slowloris), or a body at a byte a minute, is held forever and counts against the
concurrency limit. ``guarded_protocol`` is uvicorn's httptools protocol with that deadline:
from the connection's opening, and from the first byte of each later request on it, the
whole request (head and body) must arrive within ``router.request_read_timeout_s``, else
the connection is closed (a 408 first when the head is not complete; a request whose body
is late sees the client gone). Heads past ``router.max_header_bytes`` are refused with 431.
h11's own head limit is set to the same size for a deployment that runs uvicorn on h11.
Past ``limit_concurrency`` a request gets our 503 (the error body, ``Retry-After``), not
uvicorn's plain-text one.

``uvicorn_settings(config)`` gives the ``uvicorn.Config`` arguments for every router
process (cluster/launcher.py) and the tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.config import RouterConfig
from core.errors import Overloaded
from router.openai.errors import error_response

log = logging.getLogger(__name__)

_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
              b"connection: close\r\n\r\n")
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
              b"connection: close\r\n\r\n")


async def _over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    """uvicorn's ``limit_concurrency`` refusal in the API's error format."""
    error = Overloaded("The router is at its connection limit; retry shortly.",
                       retry_after=1.0)
    await error_response(error, headers={"Connection": "close"})(scope, receive, send)


class _GuardedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol with a deadline per request (head and body) and a head size limit
    (the class attributes, set by ``guarded_protocol``)."""

    read_timeout_s: float
    max_header_bytes: int
    _read_timer: asyncio.TimerHandle | None = None
    _head_bytes: int = 0
    _in_head: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request must arrive in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._arm()  # a later request on a kept-alive connection: from its first byte

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _start_asgi_task(self, cycle, app) -> None:  # type: ignore[no-untyped-def]
        super()._start_asgi_task(cycle, _over_capacity if app is service_unavailable else app)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        log.info("closing a connection whose request did not arrive within %g s "
                 "(router.request_read_timeout_s)", self.read_timeout_s)
        if self._in_head or self.cycle is None:  # nothing of a response has started
            self.transport.write(_TIMED_OUT)
        self.transport.close()


def guarded_protocol(read_timeout_s: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    return type("GuardedHttpToolsProtocol", (_GuardedHttpTools,),
                {"read_timeout_s": read_timeout_s, "max_header_bytes": max_header_bytes})


def uvicorn_settings(config: RouterConfig) -> dict[str, Any]:
    """The connection limits of ``router`` as ``uvicorn.Config`` arguments."""
    return {"http": guarded_protocol(config.request_read_timeout_s, config.max_header_bytes),
            "limit_concurrency": config.max_connections,
            "timeout_keep_alive": config.keep_alive_timeout_s,
            "h11_max_incomplete_event_size": config.max_header_bytes}
