"""Log lines of the router and the workers: text, or one JSON object per line.

Every line written while a request is being served carries its request id and, when the
request is traced, its trace and span ids: the router sets the request id when the request
arrives (``router/telemetry/observe.py``), the worker when a Generate call starts; both are
contextvars, so tasks started for the request inherit them. The trace id is the current
OpenTelemetry span's, so a log line and the trace it belongs to are one search apart.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
from typing import Any, Literal

import orjson
from opentelemetry import trace

LogFormat = Literal["text", "json"]
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "electron_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "request_id", "trace_id", "span_id", "request_tag"}


class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` (None outside a request or a
    trace) and ``request_tag`` (" [req_…]" or "") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = record.span_id = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the request
    and trace ids when known, ``extra`` fields, and the exception's traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                body[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


def configure_logging(level: str = "info", fmt: LogFormat = "text") -> None:
    """Replaces the root logger's handlers with one on stderr in ``fmt``."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
