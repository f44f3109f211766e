"""The router's listening socket, as production makes it: the launcher (``electron-serve up``
and ``router``) serves on ``router.api.server.listen_socket``, whose accepted connections
carry TCP_NODELAY whatever the event loop does, and a taken port is a clear config error."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest
import uvicorn

from cluster import launcher
from core.config import ConfigError
from router.api.server import listen_socket


def test_the_launcher_serves_on_the_routers_socket():
    assert launcher.listen_socket is listen_socket


def test_accepted_connections_inherit_tcp_nodelay():
    sock = listen_socket("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.setblocking(True)
        with socket.create_connection(sock.getsockname(), timeout=5):
            conn, _ = sock.accept()  # a plain accept: no event loop sets the option here
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_a_taken_port_is_a_config_error_naming_it():
    first = listen_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            listen_socket("127.0.0.1", port)
    finally:
        first.close()


async def test_a_started_router_has_frozen_what_startup_made():
    """Once the router serves, the objects made at startup are out of the collector's reach
    (``freeze_startup_objects``): a full collection on the event loop no longer walks them
    (docs/operations-notes.md "Full GC pauses and gc.freeze")."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gc.unfreeze()
    server = launcher._RouterServer(uvicorn.Config(app, lifespan="off", log_level="warning"))
    sock = listen_socket("127.0.0.1", 0)
    task = await launcher._start_router(server, sock, asyncio.Event())
    try:
        assert server.started
        assert gc.get_freeze_count() > 10_000
    finally:
        server.should_exit = True
        await task
        sock.close()
        gc.unfreeze()
