"""The router's connection limits on a real socket (router/api/connections.py): connections
that send part of a request and stall (slowloris) neither stop a normal request from being
served nor stay open past ``router.request_read_timeout_s``; an oversized head is refused."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from core.config import load_config
from core.endpoints import StaticWorkerSource
from router.api.app import create_app
from router.api.connections import uvicorn_settings
from tests.support.serving import serve_router, stop_router
from tests.support.tenancy import local_tenancy

pytestmark = pytest.mark.asyncio(loop_scope="function")

READ_TIMEOUT_S = 1.0


async def start_router(**router):
    config = load_config(env={}, overrides={
        "router": {"request_read_timeout_s": READ_TIMEOUT_S, **router},
        "auth": {"enabled": False}, "tenancy": local_tenancy()})
    return await serve_router(create_app(config, StaticWorkerSource([])),
                              **uvicorn_settings(config.router))


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before it closed the connection (EOF within ``timeout``)."""
    async with asyncio.timeout(timeout):
        return await reader.read()


async def test_slowloris_connections_do_not_stop_requests_and_are_closed_in_time():
    router = await start_router()
    host, port = router.base.removeprefix("http://").split(":")
    try:
        stalled = []
        for i in range(50):  # half a request head each, then nothing
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(i).encode())
            await writer.drain()
            stalled.append((reader, writer))
        # One that sends a full head, then stalls in its body.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        await writer.drain()
        stalled.append((reader, writer))
        opened = time.monotonic()
        async with httpx.AsyncClient(base_url=router.base, timeout=5) as client:
            started = time.monotonic()
            health = await client.get("/health")
            assert health.status_code == 200
            assert time.monotonic() - started < 0.5
        replies = await asyncio.gather(*(closed_by_server(r, READ_TIMEOUT_S + 2.0)
                                         for r, _ in stalled))
        assert time.monotonic() - opened < READ_TIMEOUT_S + 2.0
        assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies[:50])
        for _, w in stalled:
            w.close()
    finally:
        await stop_router(router)


async def test_a_kept_alive_connection_serves_requests_and_an_oversized_head_is_refused():
    router = await start_router(max_header_bytes=4096)
    host, port = router.base.removeprefix("http://").split(":")
    try:
        # Two requests on one connection, the second after longer than the read timeout
        # (idle time between requests is the keep-alive's, not the read timeout's).
        async with httpx.AsyncClient(base_url=router.base, timeout=5) as client:
            assert (await client.get("/health")).status_code == 200
            await asyncio.sleep(READ_TIMEOUT_S + 0.3)
            assert (await client.get("/health")).status_code == 200
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        await writer.drain()
        assert (await closed_by_server(reader, 2.0)).startswith(b"HTTP/1.1 431")
        writer.close()
    finally:
        await stop_router(router)


async def test_past_the_connection_limit_a_request_gets_our_503_with_retry_after():
    router = await start_router(max_connections=2)
    host, port = router.base.removeprefix("http://").split(":")
    try:
        idle = await asyncio.open_connection(host, int(port))  # holds one of the two
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        reply = await closed_by_server(reader, 2.0)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "overloaded"
        writer.close()
        idle[1].close()
    finally:
        await stop_router(router)
