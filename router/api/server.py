"""The router's listening socket: every router process serves on one made here (the
launcher's ``electron-serve up`` / ``router``, the tests and the benchmarks alike).

TCP_NODELAY: a router that answers with small SSE frames on kept-alive connections must not
let Nagle's algorithm hold a frame back until the client ACKs the previous one (a popular
router lost ~44 ms on the first chunk that way:
docs/operations-notes.md#sse-tcp_nodelay-or-nagle-holds-frames-back). asyncio's selector
transport, which uvicorn's h11/httptools protocols run on, sets TCP_NODELAY on every socket it
wraps (``asyncio.base_events._set_nodelay``), and so does uvloop. ``listen_socket`` makes this
independent of the event loop's choice: it sets TCP_NODELAY on the listening socket, which
Linux copies to every accepted connection; serve with
``uvicorn.Server(config).serve(sockets=[listen_socket(host, port)])``.
tests/integration/test_router_worker.py checks the option on the server's side of a live
connection.

The socket is bound before anything slow starts: a taken port fails the command at once, and
port 0 gets a free port that the banner can show.

``reuse_port``: SO_REUSEPORT, so that several router processes each listen on a socket of their
own on one port and the kernel spreads new connections over them
(``electron-serve router --processes N``, cluster/router_processes.py).
"""

from __future__ import annotations

import socket

from core.config import ConfigError


def listen_socket(host: str, port: int, backlog: int = 2048, *,
                  reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket whose accepted connections have TCP_NODELAY set.

    ConfigError (naming the address) when it cannot be bound."""
    sock = bound_socket(host, port, reuse_port=reuse_port)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the router cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def bound_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port``, not listening. Bound with SO_REUSEPORT and never
    listening, it holds a port (port 0: a free one) for the processes that will listen on it
    without taking any of their connections: the kernel spreads those over listening
    sockets only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the router cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock
