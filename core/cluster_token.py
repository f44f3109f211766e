"""The cluster token: what a worker's gRPC port asks of every caller.

A worker's port serves inference unmetered, with any priority and cache salt, aborts any
request id and streams every cached block hash (WatchState): only the cluster's own routers
may call it. Each call carries the token ``cluster.token`` in the metadata entry
``TOKEN_METADATA_KEY``; the worker's ``TokenServerInterceptor`` compares it in constant time
and ends a call without it, or with another, with ``UNAUTHENTICATED`` before any handler
runs (every method: Session, Generate, Abort, WatchState, GetInfo and grpc.health.v1). The
router's channel adds it to every unary-request call (``token_client_interceptors``); the
Session stream carries it in its own call metadata (``token_metadata``).

Where it comes from: ``electron-serve up`` makes one per run (``new_cluster_token``) and
hands it to its workers and its router in their config; ``electron-serve worker`` and
``router`` joining a cluster must be given the same one (``ELECTRON_CLUSTER__TOKEN``; the
Helm chart reads it from a Secret).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "electron-cluster-token"
REFUSAL_MESSAGE = "this worker serves only its cluster's routers: a valid cluster token is required"
# A refused caller is logged at most this often (a scanner must not flood the log).
_LOG_EVERY_S = 10.0


def new_cluster_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | bytes | None, token: str) -> bool:
    """Whether ``given`` is ``token``, compared in constant time."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode()
    return hmac.compare_digest(given, token.encode())


# -- the worker's side --------------------------------------------------------------------------

class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call whose metadata lacks the cluster token."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the cluster token must not be empty")
        self._token = token
        self._refused = 0
        self._logged_at = float("-inf")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        given = None
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                given = value
                break
        if token_matches(given, self._token):
            return handler
        self._note_refusal(details.method, given is None)
        return _refusing(handler)

    def _note_refusal(self, method: str, missing: bool) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("refused a call to %s: %s cluster token (%d refused so far)", method,
                        "no" if missing else "a wrong", self._refused)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL_MESSAGE)


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL_MESSAGE)
    yield  # pragma: no cover - abort raises; this makes it an async generator


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=_refuse)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=_refuse_stream)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=_refuse)
    return handler._replace(stream_stream=_refuse_stream)


# -- the router's side --------------------------------------------------------------------------

def _with_token(details: grpc.aio.ClientCallDetails, entry: tuple[str, str]
                ) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), entry)
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, entry: tuple[str, str]):
        self._entry = entry

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._entry), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, entry: tuple[str, str]):
        self._entry = entry

    async def intercept_unary_stream(self, continuation, details, request):
        # The call itself, not a generator over it: reads and cancel reach it directly.
        return await continuation(_with_token(details, self._entry), request)


def token_client_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that add ``token`` to every unary-request call of a channel (none for
    None). A streaming-request call (the Session) passes ``token_metadata`` itself."""
    if token is None:
        return []
    entry = (TOKEN_METADATA_KEY, token)
    return [_UnaryUnary(entry), _UnaryStream(entry)]


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries ``token`` (None for None)."""
    return None if token is None else ((TOKEN_METADATA_KEY, token),)
