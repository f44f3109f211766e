"""The HTTP boundary of the error taxonomy: the one place that builds OpenAI's error body.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}`` (all four
keys, ``param``/``code`` may be null) with the status of the ``core.errors`` class. The
message is the error's ``public_message``: a worker failure or an internal error says what
happened in fixed words, never which worker, which address or what the peer said (that goes
to the log, with the request id).
Validation failures are 400 here, never FastAPI's 422; every 429 and every 503 carries
``Retry-After`` (``headers_of``, whatever the error's class: worker failures, shedding, the
drain, an unreachable limit store or database, uvicorn's own concurrency limit in
router/api/connections.py); an exception of another library that stands for one of ours is
answered as that one (``install_error_handlers``' ``translate``: the app's ``RedisError``
from anywhere in a route is a 503, never a 500); an unexpected exception is logged with its
traceback and answered with a generic 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from core.errors import (
    ElectronError,
    InternalError,
    InvalidRequest,
    RateLimited,
)

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
GENERIC_500 = InternalError.public_text or ""
RETRIED_STATUSES = (429, 503)  # each carries Retry-After
DEFAULT_RETRY_AFTER_S = 1.0


def retry_after_header(seconds: float | None) -> str:
    """Whole seconds, at least 1 (``DEFAULT_RETRY_AFTER_S`` when the error names none)."""
    return str(max(1, math.ceil(DEFAULT_RETRY_AFTER_S if seconds is None else seconds)))


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def body_of(exc: ElectronError) -> dict[str, Any]:
    return error_body(exc.public_message, exc.type, exc.param, exc.code)


def headers_of(exc: ElectronError) -> dict[str, str]:
    """Retry-After (whole seconds, at least 1) and any limit headers the error carries."""
    headers: dict[str, str] = {}
    if exc.status in RETRIED_STATUSES:
        headers["Retry-After"] = retry_after_header(exc.retry_after)
    if isinstance(exc, RateLimited):
        headers.update(exc.headers)
    return headers


def error_response(exc: ElectronError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body_of(exc)), status_code=exc.status,
                    headers={**headers_of(exc), **(headers or {})},
                    media_type="application/json")


def param_of(loc: Sequence[str | int]) -> str | None:
    """``("messages", 0, "role")`` -> ``"messages[0].role"`` (None for the whole body)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def from_validation_errors(errors: Iterable[Mapping[str, Any]],
                           strip: tuple[str, ...] = ()) -> InvalidRequest:
    """The first pydantic error as a 400; ``strip`` drops a leading location part (FastAPI's
    ``"body"``, ``"query"``, …)."""
    first = next(iter(errors), None)
    if first is None:
        return InvalidRequest("The request is invalid.")
    loc = tuple(first.get("loc", ()))
    if loc and loc[0] in strip:
        loc = loc[1:]
    param = param_of(loc)
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param is None:
        message = f"Invalid request body: {first.get('msg')}."
    else:
        message = f"Invalid value for '{param}': {first.get('msg')}."
    return InvalidRequest(message, param=param)


def invalid_json(detail: str) -> InvalidRequest:
    return InvalidRequest(
        "We could not parse the JSON body of your request (" + detail + "). The body must be "
        "a JSON object sent with Content-Type: application/json.")


def _request_id_headers(request: Request) -> dict[str, str]:
    request_id = getattr(request.state, "request_id", None)
    return {REQUEST_ID_HEADER: request_id} if request_id else {}


async def _electron_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ElectronError)
    if exc.status >= 500:
        log.warning("request %s failed: %s: %s", getattr(request.state, "request_id", None),
                    type(exc).__name__, exc.message)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # FastAPI prefixes where the value came from; the param is the field's own name.
    return error_response(from_validation_errors(
        exc.errors(), strip=("body", "query", "path", "header", "cookie")))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return Response(orjson.dumps(error_body(message, kind)), status_code=exc.status_code,
                    headers=dict(exc.headers or {}), media_type="application/json")


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Runs in Starlette's outermost middleware, outside router.api.middleware: the request id
    # header is added here. The traceback goes to the log, never to the client.
    # Starlette re-raises the exception once this response is sent, and the server then closes
    # the connection: ``Connection: close`` tells the client so, instead of letting it send
    # its next request on a kept-alive connection that is being reset.
    log.error("request %s: unhandled %s", getattr(request.state, "request_id", None),
              type(exc).__name__, exc_info=exc)
    return error_response(InternalError(GENERIC_500),
                          headers={**_request_id_headers(request), "Connection": "close"})


def install_error_handlers(app: FastAPI,
                           translate: Mapping[type[Exception],
                                              Callable[[Exception], ElectronError]] | None = None
                           ) -> None:
    """``translate``: exceptions of other libraries that stand for one of ours (the app's
    ``RedisError``: the limit store is unavailable), answered as that error wherever a route
    meets them."""
    for kind, to_error in (translate or {}).items():
        async def translated(request: Request, exc: Exception, to_error=to_error) -> Response:
            return await _electron_error(request, to_error(exc))

        app.add_exception_handler(kind, translated)
    app.add_exception_handler(ElectronError, _electron_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
