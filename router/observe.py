"""One request's observability on the router: its metrics, its spans, its log context.

``ObservabilityMiddleware`` (plain ASGI) starts an ``Observation`` for each chat-completion
request and makes it current (a contextvar, which the tasks started for the request
inherit); the code on the request's path reports to it through the module functions
(``span``, ``routed``, ``set_model``), which do nothing outside a request (the routing
simulator and benchmarks call the same code). ``GenerateStream`` keeps the observation of
the call it belongs to and reports each delta.

Spans (children of the HTTP server span that ``Tracing.instrument_app`` opens):
``auth_and_limits``, ``tokenize`` (chat template and tokenizer), ``route`` (policy,
chosen worker, reason, predicted cached tokens, candidates) and the Generate client span
(``Tracing.start_generate_span``), whose context travels to the worker in gRPC metadata.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry.trace import Span
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.logs import request_id_var
from cluster.telemetry import DISABLED, Tracing
from router.metrics import OTHER_MODEL, RouterMetrics, plan_of

_current: contextvars.ContextVar[Observation | None] = contextvars.ContextVar(
    "electron_observation", default=None)
CHAT_PATH_SUFFIX = "/chat/completions"


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

    def delta(self, cached_tokens: int | None) -> None:
        """A delta arrived; ``cached_tokens`` is set on a finished sequence's last one."""
        now = time.monotonic()
        if self.first_delta is None:
            self.first_delta = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last_delta)
        self.last_delta = now
        if cached_tokens is not None and self.policy:
            self.metrics.actual_cached.labels(self.policy).inc(cached_tokens)


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


def set_model(model: str, served: str) -> None:
    """The request's model label: the id asked for when it is served, else "other"."""
    obs = _current.get()
    if obs is not None:
        obs.model = model if model == served else OTHER_MODEL


def routed(policy: str, choice: Any, num_prompt_tokens: int, candidates: int,
           route_span: Span | None) -> None:
    """A policy chose a worker (``choice`` is a ``router.policy.Choice``)."""
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


class ObservabilityMiddleware:
    """Sets the log context of every HTTP request (its request id, from
    ``RequestContextMiddleware``, which must run outside this one) and observes each
    chat-completion request: ``electron:requests_total`` by status, model and plan, and its
    end-to-end latency (to the last byte of a stream)."""

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
        try:
            if not scope["path"].endswith(CHAT_PATH_SUFFIX):
                await self.app(scope, receive, send)
                return
            await self._observed(scope, receive, send, state)
        finally:
            request_id_var.reset(id_token)

    async def _observed(self, scope: Scope, receive: Receive, send: Send,
                        state: dict[str, Any]) -> None:
        obs = Observation(self.metrics, self.tracing, time.monotonic())
        token = _current.set(obs)
        status = 500  # an exception that escapes becomes the outer handler's 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            self.metrics.e2e.observe(time.monotonic() - obs.arrival)
            self.metrics.requests.labels(str(status), obs.model or OTHER_MODEL,
                                         plan_of(state.get("principal"))).inc()
