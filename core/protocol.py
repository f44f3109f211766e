"""What both ends of the gRPC wire agree on, beyond the messages in
proto/electron/v1/worker.proto: the service's name, the meaning of the finish reasons a worker
sends, the tags a tool call is written in, and how errors cross (both directions).

Errors: a worker ends a failed RPC with the status ``status_code_for`` gives and the trailing
metadata ``error_metadata`` gives (``electron-error``: JSON ``{"type", "code", "param",
"message"}``, and ``retry_after`` when the error carries one); the router rebuilds the same
``core.errors`` class from them (``error_from_rpc``). A worker that failed, vanished or timed
out is ``WorkerUnavailable``, which the router may retry elsewhere; an error the request
caused (``INVALID_ARGUMENT``, also mid-stream when the worker could not sample it) comes back
as its ``InvalidRequest`` and is neither retried nor counted against the worker.

The router and the workers import it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from core.errors import (
    ElectronError,
    InternalError,
    InvalidRequest,
    Overloaded,
    RateLimited,
    WorkerUnavailable,
)
from core.pb.electron.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)

# The full name of the Worker service ("electron.v1.Worker"): also the name its health is
# reported under (grpc.health.v1), which routers check before they connect.
WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name

# A choice's last delta carries one of these (``GenerateResponse.finish_reason``).
FINISH_STOP = "stop"      # EOS, a stop string or a stop token
FINISH_LENGTH = "length"  # max_tokens, or the context window
FINISH_ABORT = "abort"    # the worker gave the request up (it was cancelled or stopping)
FINISH_ERROR = "error"    # the worker failed the request
# The worker did not finish the request: the router may retry it elsewhere.
WORKER_GAVE_UP = frozenset({FINISH_ABORT, FINISH_ERROR})

# A tool call in generated text: TOOL_CALL_OPEN {"name": ..., "arguments": {...}} TOOL_CALL_CLOSE.
# The worker's grammar enforces it, the router's prompt asks for it and its parser reads it.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


# -- errors -------------------------------------------------------------------------------------

ERROR_METADATA_KEY = "electron-error"
# Status codes meaning "this worker could not serve it", whatever its metadata says.
_WORKER_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED,
})


def status_code_for(error: ElectronError) -> grpc.StatusCode:
    """The status a worker ends an RPC with when it fails with ``error``."""
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def error_metadata(error: ElectronError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries ``error`` to the router."""
    body: dict[str, Any] = {"type": error.type, "code": error.code, "param": error.param,
                            "message": error.message}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        body["retry_after"] = retry_after
    # json.dumps escapes non-ASCII, and ASCII is what plain (non "-bin") metadata may carry.
    return ((ERROR_METADATA_KEY, json.dumps(body)),)


def error_from_rpc(exc: grpc.aio.AioRpcError, worker_id: str) -> ElectronError:
    """The error a worker's failed RPC stands for (see the module docstring)."""
    return error_from_status(exc.code(), exc.details() or "", exc.trailing_metadata(),
                             worker_id)


def error_from_status(code: grpc.StatusCode, details: str,
                      metadata: Iterable[tuple[str, str | bytes]] | None,
                      worker_id: str) -> ElectronError:
    """The error a worker's failure status stands for: a failed RPC's, or a Session
    request's end (``SessionEnd``)."""
    if code in _WORKER_FAILURES:
        return WorkerUnavailable(f"worker {worker_id} failed: {code.name}: {details}")
    body = _error_body(metadata)
    if body is None:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details or "invalid request")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # gRPC's own (message sizes, limits): the log's, not the client's.
            log.warning("worker %s: RESOURCE_EXHAUSTED: %s", worker_id, details)
            return Overloaded("the worker is overloaded")
        return WorkerUnavailable(f"worker {worker_id} failed: {code.name}: {details}")
    cls = _error_class(body.get("type"), body.get("code"))
    message = str(body.get("message") or details or "")
    code_field = body.get("code")
    if issubclass(cls, (RateLimited, Overloaded)):
        return cls(message, retry_after=float(body.get("retry_after") or 1.0), code=code_field)
    return cls(message, param=body.get("param"), code=code_field)


def error_from_session_end(end: pb.SessionEnd, worker_id: str) -> ElectronError:
    """The error a failed ``SessionEnd`` (status not OK) stands for."""
    try:
        code = _STATUS_BY_VALUE[end.status]
    except KeyError:
        code = grpc.StatusCode.UNKNOWN
    metadata = ((ERROR_METADATA_KEY, end.error),) if end.error else ()
    return error_from_status(code, end.details, metadata, worker_id)


def session_end(request_id: str, error: ElectronError | None = None) -> pb.SessionEnd:
    """A Session request's end: OK, or ``error`` as ``status_code_for`` and
    ``error_metadata`` carry it in a Generate call."""
    if error is None:
        return pb.SessionEnd(request_id=request_id)
    return pb.SessionEnd(request_id=request_id, status=status_code_for(error).value[0],
                         details=error.message, error=error_metadata(error)[0][1])


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _all_error_classes() -> list[type[ElectronError]]:
    """The wire's taxonomy: the classes of core/errors.py. A subclass one side defines for
    itself (the router's DatabaseUnavailable is an Overloaded) never stands for a worker's
    error, whichever modules happen to be imported."""
    found, todo = [], [ElectronError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == ElectronError.__module__:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _error_class(type_: str | None, code: str | None) -> type[ElectronError]:
    """The most specific taxonomy class with this type and code (code may be unknown)."""
    classes = [c for c in _all_error_classes() if c.type == type_]
    exact = [c for c in classes if code is not None and c.code == code]
    if exact:
        return max(exact, key=lambda c: len(c.__mro__))
    generic = [c for c in classes if c.code is None and c is not ElectronError] or classes
    if generic:
        return min(generic, key=lambda c: len(c.__mro__))
    return InternalError


def _error_body(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, Any] | None:
    for key, value in metadata or ():
        if key == ERROR_METADATA_KEY:
            try:
                body = json.loads(value)
            except (TypeError, ValueError):
                log.warning("unreadable %s metadata from a worker: %r", key, value)
                return None
            return body if isinstance(body, dict) else None
    return None
