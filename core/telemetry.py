"""Tracing setup, shared by the router and the workers: OpenTelemetry from the standard
``OTEL_*`` environment variables.

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) switches tracing
  on; without one no SDK tracer provider exists and every span is the API's no-op (the hot
  paths also skip span work altogether: ``Tracing.enabled``).
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``): ``grpc`` (default, as the
  Python SDK's ``otlp`` exporter) or ``http/protobuf``.
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (e.g. ``parentbased_traceidratio`` and
  ``0.1``), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, the exporter's headers,
  timeouts and TLS settings: read by the SDK itself.
- ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off again.

These are the one exception to "environment variables are read in core/config.py": they
are OpenTelemetry's own standard, and the SDK reads most of them anyway.

Each process builds one ``Tracing`` before it opens gRPC channels or servers
(docs/operations-notes.md#opentelemetry-set-up-tracing-before-any-grpc-channel-or-server) and
hands it down explicitly; the provider is not installed globally, so several apps in one
process (tests, benchmarks) do not share one. Context crosses to the workers as W3C
``traceparent`` (Ray carries none): in a Generate call's metadata, or in the request's
``trace_context`` when it travels in a Session (the router's path). ``shutdown()`` flushes: call it from an explicit stop
(``ray.kill`` is SIGKILL; atexit never runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Tracer

from core.config import ConfigError

log = logging.getLogger(__name__)

TRACER_NAME = "electron-serve"
GENERATE_METHOD = "Generate"
GENERATE_SPAN = "electron.v1.Worker/Generate"
# The worker's span of one request: the name gRPC's instrumentation gives a Generate call's
# server span, also for a request that came in a Session (request_span).
GENERATE_SERVER_SPAN = "/electron.v1.Worker/Generate"
PROTOCOLS = ("grpc", "http/protobuf")


class Tracing:
    """One process's tracing: a tracer (the API's no-op one when disabled) and the gRPC
    hooks that carry context to the workers."""

    def __init__(self, provider: Any | None = None):
        """``provider`` is an ``opentelemetry.sdk.trace.TracerProvider`` (None: disabled)."""
        self.provider = provider
        self.enabled = provider is not None
        self.tracer: Tracer = (provider.get_tracer(TRACER_NAME) if provider is not None
                               else trace.NoOpTracer())

    # -- router side (its HTTP server span: router/telemetry/observe.py)

    def start_generate_span(self, worker_id: str, address: str
                            ) -> tuple[Span | None, tuple[tuple[str, str], ...]]:
        """The client span of one Generate call, a child of the current span, and the gRPC
        metadata that carries it to the worker ((None, ()) when disabled). The caller ends
        the span when the call ends (``GenerateStream`` does)."""
        if not self.enabled:
            return None, ()
        host, _, port = address.rpartition(":")
        span = self.tracer.start_span(GENERATE_SPAN, kind=SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": "electron.v1.Worker",
            "rpc.method": GENERATE_METHOD, "server.address": host,
            "server.port": int(port) if port.isdigit() else 0,
            "electron.worker_id": worker_id})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, tuple(carrier.items())

    # -- worker side

    def server_interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """The server span of each Generate call, continuing the router's trace from the
        call's metadata (other methods, such as the long WatchState stream, get none)."""
        if not self.enabled:
            return ()
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return (aio_server_interceptor(tracer_provider=self.provider,
                                       filter_=filters.method_name(GENERATE_METHOD)),)

    @contextlib.contextmanager
    def request_span(self, carrier: Mapping[str, str]) -> Iterator[Span | None]:
        """The server span of one request that came in a Session, continuing the trace its
        ``trace_context`` carries, current while the block runs (None when disabled)."""
        if not self.enabled:
            yield None
            return
        with self.tracer.start_as_current_span(
                GENERATE_SERVER_SPAN, context=propagate.extract(dict(carrier)),
                kind=SpanKind.SERVER, attributes={
                    "rpc.system": "grpc", "rpc.service": "electron.v1.Worker",
                    "rpc.method": GENERATE_METHOD, "electron.transport": "session"}) as span:
            yield span

    def shutdown(self) -> None:
        """Exports what is buffered and stops the exporter."""
        if self.provider is not None:
            self.provider.force_flush()
            self.provider.shutdown()


DISABLED = Tracing()


def _first(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return ""


def tracing_from_env(service_name: str, env: Mapping[str, str] | None = None) -> Tracing:
    """Tracing as the ``OTEL_*`` variables describe it (see the module docstring);
    ``service_name`` is used unless ``OTEL_SERVICE_NAME`` names another."""
    env = os.environ if env is None else env
    endpoint = _first(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if (not endpoint or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
            or env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none"):
        return DISABLED
    protocol = _first(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                      "OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected one of "
                          f"{', '.join(PROTOCOLS)}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    # The exporters read the endpoint (and headers, TLS, timeout) from the environment; an
    # explicit mapping (tests) passes its endpoint on.
    exporter_args: dict[str, Any] = {}
    if env is not os.environ:
        exporter_args["endpoint"] = endpoint if protocol == "grpc" or \
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in env else endpoint.rstrip("/") + "/v1/traces"
    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; an explicit
    # attribute would win over them, so the default name is given only when none is set.
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    # No sampler argument: the SDK reads OTEL_TRACES_SAMPLER(_ARG) (default: parent-based,
    # always on).
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**exporter_args)))
    log.info("tracing: OTLP/%s to %s as %s", protocol, endpoint,
             env.get("OTEL_SERVICE_NAME") or service_name)
    return Tracing(provider)
