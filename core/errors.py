"""One error taxonomy for the whole service.

Every failure a client can cause or see is one of these. Each boundary maps them once:
``router/openai/errors.py`` to HTTP status and the OpenAI error body, ``core/protocol.py`` to
gRPC status codes and trailing metadata (the worker's side) and back (the router's side).
"""

from __future__ import annotations


class ElectronError(Exception):
    """Base class. ``status`` is the HTTP status, ``type``/``code`` the OpenAI error fields."""

    status = 500
    type = "server_error"
    code: str | None = None
    # What a client is told instead of ``message`` (None: the message itself). A class whose
    # messages are for the log (they may name a worker, a peer address or a database host)
    # sets a fixed text here; router/openai/errors.py builds every body from it.
    public_text: str | None = None
    # Seconds a client should wait before retrying (the ``Retry-After`` header): every 503
    # and 429 has one (router/openai/errors.py answers 1 s for a class that sets none).
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def public_message(self) -> str:
        return self.public_text or self.message


class InvalidRequest(ElectronError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class AuthenticationFailed(ElectronError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ElectronError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class RateLimited(ElectronError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.headers = headers or {}


class Overloaded(ElectronError):
    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class NoWorkers(Overloaded):
    code = "no_workers"


class WorkerUnavailable(ElectronError):
    """A worker failed or vanished; the router may retry elsewhere if nothing was sent yet."""

    status = 503
    type = "server_error"
    code = "worker_unavailable"
    public_text = ("The model worker serving this request failed or became unavailable; "
                   "retry the request.")
    retry_after = 1.0


class InternalError(ElectronError):
    status = 500
    type = "server_error"
    code = None
    public_text = ("The server had an error while processing your request. Sorry about that! "
                   "Retry the request, or contact support with the X-Request-Id of this "
                   "response.")
