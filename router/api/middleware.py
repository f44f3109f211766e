"""Per-request HTTP plumbing: the request id and the body size limit.

``RequestContextMiddleware`` is plain ASGI (no BaseHTTPMiddleware: that would buffer SSE and
hide client disconnects from the streaming response).
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import InvalidRequest, PayloadTooLarge
from router.openai.errors import REQUEST_ID_HEADER, error_response

_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
_MAX_REQUEST_ID_LEN = 128


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _client_request_id(raw: bytes | None) -> str | None:
    """The client's id if it is short printable ASCII (it is echoed into a header)."""
    if raw is None or not 0 < len(raw) <= _MAX_REQUEST_ID_LEN:
        return None
    if not all(0x21 <= b <= 0x7E for b in raw):
        return None
    return raw.decode("ascii")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")


class RequestContextMiddleware:
    """Gives every HTTP request an id (``request.state.request_id``, echoed in
    ``X-Request-Id`` on every response and carried by its logs and traces: the client's own
    when it sent a usable one, else the server's) and enforces the body size limit. The
    server always makes its own id too (``request.state.server_request_id``): a client may
    send the same ``X-Request-Id`` on every request, so only the server's identifies one
    (the ledger row's key); ``request.state.client_request_id`` is the client's, or None.

    The limit is checked twice: a declared ``Content-Length`` over it is refused before the
    app runs; a body sent without one (chunked) is counted as it is read, and the read that
    crosses the limit raises ``PayloadTooLarge`` inside the handler, which the error handlers
    turn into the 413 body.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        client_id = _client_request_id(headers.get(_REQUEST_ID_HEADER_BYTES))
        server_id = new_request_id()
        request_id = client_id or server_id
        # The same dict Starlette's outer error middleware sees: its 500 handler reads it.
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_id
        state["server_request_id"] = server_id
        id_header = (_REQUEST_ID_HEADER_BYTES, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", ()))
                if not any(k.lower() == _REQUEST_ID_HEADER_BYTES for k, _ in raw):
                    raw.append(id_header)
                message = {**message, "headers": raw}
            await send(message)

        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                response = error_response(InvalidRequest("Invalid Content-Length header."))
                await response(scope, receive, send_with_id)
                return
            if length > limit:
                await error_response(_too_large(limit))(scope, receive, send_with_id)
                return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send_with_id)
