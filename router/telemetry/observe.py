"""One request's observability on the router: its metrics, its spans, its log context.

``ObservabilityMiddleware`` (plain ASGI) opens the HTTP server span of each API request
(continuing an incoming W3C ``traceparent``), and starts an ``Observation`` for each
chat-completion request and makes it current (a contextvar, which the tasks started for the
request inherit); the code on the request's path reports to it through the module functions
(``span``, ``routed``, ``set_model``), which do nothing outside a request (the routing
simulator and benchmarks call the same code). ``GenerateStream`` keeps the observation of
the call it belongs to and reports each delta.

Spans, children of the server span: ``auth`` (the key), ``limits`` (the tenant's plan
limits, chat only), ``tokenize`` (chat template and
tokenizer), ``route`` (policy, chosen worker, reason, predicted cached tokens, candidates)
and the Generate client span (``Tracing.start_generate_span``), whose context travels to the
worker in gRPC metadata.

Why not opentelemetry-instrumentation-fastapi: its ASGI middleware wraps every message of
the response, each SSE chunk included, even with the send spans excluded; measured here
(17-chunk stream, loaded 2-core machine) it added ~0.45 ms per request over one span, most
of the tracing budget of a streamed request.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.logs import request_id_var
from core.telemetry import DISABLED, Tracing
from router.telemetry.metrics import OTHER_MODEL, RouterMetrics, plan_of

_current: contextvars.ContextVar[Observation | None] = contextvars.ContextVar(
    "electron_observation", default=None)
CHAT_PATH_SUFFIX = "/chat/completions"
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes
_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


class Observation:
    """Timings and labels of one chat-completion request (monotonic seconds)."""

    __slots__ = ("metrics", "tracing", "arrival", "model", "policy", "dispatched_at",
                 "last_delta", "first_delta")

    def __init__(self, metrics: RouterMetrics, tracing: Tracing, arrival: float):
        self.metrics = metrics
        self.tracing = tracing
        self.arrival = arrival
        self.model: str | None = None
        self.policy = ""
        self.dispatched_at: float | None = None
        self.first_delta: float | None = None
        self.last_delta = 0.0

    def dispatched(self) -> None:
        """A Generate call is being sent (the first one: a retry is not queueing)."""
        if self.dispatched_at is None:
            self.dispatched_at = now = time.monotonic()
            self.metrics.queue.observe(now - self.arrival)

    def delta(self) -> None:
        """A delta arrived."""
        now = time.monotonic()
        if self.first_delta is None:
            self.first_delta = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last_delta)
        self.last_delta = now


def current() -> Observation | None:
    return _current.get()


@contextlib.contextmanager
def span(name: str) -> Iterator[Span | None]:
    """A child span of the current one, when this request is traced (else None)."""
    obs = _current.get()
    if obs is None or not obs.tracing.enabled:
        yield None
        return
    with obs.tracing.tracer.start_as_current_span(name) as s:
        yield s


def cached_tokens(tokens: int) -> None:
    """The request ended with ``tokens`` of its prompt found cached (its usage count's)."""
    obs = _current.get()
    if obs is not None and obs.policy and tokens:
        obs.metrics.actual_cached.labels(obs.policy).inc(tokens)


def set_model(model: str, served: str) -> None:
    """The request's model label: the id asked for when it is served, else "other"."""
    obs = _current.get()
    if obs is not None:
        obs.model = model if model == served else OTHER_MODEL


def routed(policy: str, choice: Any, num_prompt_tokens: int, candidates: int,
           route_span: Span | None) -> None:
    """A policy chose a worker (``choice`` is a ``router.routing.policy.Choice``)."""
    obs = _current.get()
    if obs is None:
        return
    label = choice.label or policy
    predicted = max(num_prompt_tokens - choice.prefill_tokens, 0)
    metrics = obs.metrics
    metrics.routing.labels(policy, label).inc()
    metrics.predicted_cached.labels(policy).inc(predicted)
    obs.policy = policy
    if route_span is not None:
        attributes: dict[str, Any] = {
            "electron.routing.policy": policy, "electron.routing.worker": choice.worker.worker_id,
            "electron.routing.reason": choice.reason, "electron.routing.reason_label": label,
            "electron.routing.predicted_cached_tokens": predicted,
            "electron.routing.candidates": candidates}
        if choice.predicted_ttft_s is not None:
            attributes["electron.routing.predicted_ttft_s"] = choice.predicted_ttft_s
        route_span.set_attributes(attributes)


def _route_name(method: str, path: str) -> str:
    """The span name: method and route (a model id in the path is not part of it)."""
    base, sep, _ = path.partition("/models/")
    return f"{method} {base}/models/{{model_id}}" if sep else f"{method} {path}"


class ObservabilityMiddleware:
    """Sets the log context of every HTTP request (its request id, from
    ``RequestContextMiddleware``, which must run outside this one), opens the server span of
    traced requests, and observes each chat-completion request: ``electron:requests_total``
    by status, model and plan, and its end-to-end latency (to the last byte of a stream)."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics, tracing: Tracing = DISABLED):
        self.app = app
        self.metrics = metrics
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        id_token = request_id_var.set(state.get("request_id"))
        path = scope["path"]
        chat = path.endswith(CHAT_PATH_SUFFIX)
        traced = self.tracing.enabled and path not in UNTRACED_PATHS
        try:
            if chat or traced:
                await self._observed(scope, receive, send, state, chat, traced)
            else:
                await self.app(scope, receive, send)
        finally:
            request_id_var.reset(id_token)

    async def _observed(self, scope: Scope, receive: Receive, send: Send,
                        state: dict[str, Any], chat: bool, traced: bool) -> None:
        arrival = time.monotonic()
        obs = Observation(self.metrics, self.tracing, arrival) if chat else None
        obs_token = _current.set(obs)
        status = 500  # an exception that escapes becomes the outer handler's 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span: Span | None = None
        context_token = None
        if traced:
            span = self._server_span(scope)
            context_token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
            raise
        finally:
            _current.reset(obs_token)
            if span is not None:
                otel_context.detach(context_token)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                span.end()
            if obs is not None:
                self.metrics.e2e.observe(time.monotonic() - arrival)
                self.metrics.requests.labels(str(status), obs.model or OTHER_MODEL,
                                             plan_of(state.get("principal"))).inc()

    def _server_span(self, scope: Scope) -> Span:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in _PROPAGATION_HEADERS}
        parent = propagate.extract(carrier) if carrier else None
        method, path = scope["method"], scope["path"]
        name = _route_name(method, path)
        return self.tracing.tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                              attributes={
                                                  "http.request.method": method,
                                                  "http.route": name.partition(" ")[2],
                                                  "url.path": path,
                                                  "url.scheme": scope.get("scheme", "http"),
                                                  "network.protocol.version":
                                                      scope.get("http_version", "1.1")})
