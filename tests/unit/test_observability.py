"""Tracing set-up from the OTEL_* variables, JSON log lines with request and trace ids, and
the router's metrics route (no network beyond the ASGI transport, no Ray)."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import socket
import time
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from core.config import ConfigError, load_config
from core.endpoints import StaticWorkerSource
from core.heap import GC_THRESHOLDS
from core.logs import (
    JsonFormatter,
    RequestContextFilter,
    configure_logging,
    request_id_var,
)
from core.telemetry import DISABLED, tracing_from_env
from router.api.app import create_app
from router.telemetry.metrics import LOOP_LAG_INTERVAL_S, RouterMetrics, plan_of
from tests.support.tenancy import local_tenancy

ENDPOINT = "http://127.0.0.1:4317"


def no_auth_config():
    """Auth off explicitly (bad JSON must reach the parser), tenancy files in a temp dir."""
    return load_config(env={}, overrides={"auth": {"enabled": False},
                                          "tenancy": local_tenancy()})



def test_no_endpoint_means_tracing_is_off_and_costs_nothing():
    tracing = tracing_from_env("electron-router", env={})
    assert tracing is DISABLED and not tracing.enabled and tracing.provider is None
    assert tracing.server_interceptors() == ()
    assert tracing.start_generate_span("w0", "127.0.0.1:1") == (None, ())
    for env in ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"},
                {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}):
        assert tracing_from_env("electron-router", env=env) is DISABLED


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_an_endpoint_installs_a_provider_with_the_chosen_exporter(protocol):
    tracing = tracing_from_env("electron-router", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
    try:
        assert tracing.enabled and isinstance(tracing.provider, TracerProvider)
        assert tracing.provider.resource.attributes["service.name"] == "electron-router"
        span, metadata = tracing.start_generate_span("w0", "127.0.0.1:5000")
        assert span is not None and span.is_recording()
        (key, value), = metadata
        trace_id = format(span.get_span_context().trace_id, "032x")
        assert key == "traceparent" and value.split("-")[1] == trace_id
    finally:
        tracing.provider.shutdown()  # before the span ends: nothing to send (no collector)
    span.end()


def test_an_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing_from_env("x", env={"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                                   "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def _record(message: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord("router.chat.service", logging.WARNING, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    RequestContextFilter().filter(record)
    return record


def test_json_log_lines_carry_the_request_and_trace_ids():
    provider = TracerProvider()
    token = request_id_var.set("req_abc")
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            line = JsonFormatter().format(_record("worker %s gone", worker="w1"))
            context = span.get_span_context()
    finally:
        request_id_var.reset(token)
        provider.shutdown()
    body = json.loads(line)
    assert body["message"] == "worker %s gone" and body["level"] == "warning"
    assert body["request_id"] == "req_abc"
    assert body["trace_id"] == format(context.trace_id, "032x")
    assert body["span_id"] == format(context.span_id, "016x")
    assert body["worker"] == "w1" and body["logger"] == "router.chat.service"
    outside = json.loads(JsonFormatter().format(_record("idle")))
    assert "request_id" not in outside and "trace_id" not in outside


def test_configure_logging_writes_one_json_object_per_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json")
        token = request_id_var.set("req_1")
        logging.getLogger("router.test").info("first")
        request_id_var.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("router.test").exception("second")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "req_1" and first["message"] == "first"
    assert "ValueError: boom" in second["exception"] and "request_id" not in second


def test_plan_label_is_none_without_a_principal():
    assert plan_of(None) == "none"

    class Plan:
        name = "pro"

    class Principal:
        plan = Plan()

    assert plan_of(Principal()) == "pro"


async def test_router_metrics_route_serves_prometheus_text():
    app = create_app(no_auth_config(), StaticWorkerSource([]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        bad = await http.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400
        response = await http.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    requests = families["electron:requests"]
    assert [(s.labels, s.value) for s in requests.samples if s.name.endswith("_total")] == [
        ({"status": "400", "model": "other", "plan": "none"}, 1.0)]
    assert set(families) >= {name.removesuffix("_total") for name in (
        "electron:time_to_first_token_seconds", "electron:inter_token_latency_seconds",
        "electron:e2e_request_latency_seconds", "electron:router_queue_time_seconds",
        "electron:routing_decisions_total", "electron:rate_limit_rejections_total")}


async def test_with_a_metrics_port_the_api_port_serves_no_metrics():
    config = load_config(env={}, overrides={"auth": {"enabled": False},
                                            "tenancy": local_tenancy(),
                                            "router": {"metrics_port": 0}})
    app = create_app(config, StaticWorkerSource([]))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            bad = await http.post("/v1/chat/completions", content=b"{not json")
            assert bad.status_code == 400
            public = await http.get("/metrics")
        port = app.state.metrics_port
        async with httpx.AsyncClient() as http:
            private = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert public.status_code == 404 and "electron:" not in public.text
    assert private.status_code == 200
    assert 'electron:requests_total{model="other",plan="none",status="400"} 1.0' in private.text
    # Stopped with the app: nothing listens there any more (SO_REUSEADDR: the closed
    # connection's TIME_WAIT does not count, a listener would).
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


async def _loop_lag_metrics(app) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        text = (await http.get("/metrics")).text
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_the_routers_loop_lag_metric_tells_a_waiting_loop_from_a_busy_one():
    """The app's lifespan runs the lag timer. A callback that holds the loop without using
    CPU (waiting) shows up as the worst lag with little CPU; a longer one that computes
    shows up with its CPU time; both in the histogram's tail, as /metrics serves them."""
    app = create_app(no_auth_config(), StaticWorkerSource([]))
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.05)  # a few ordinary wakeups
        time.sleep(0.15)  # the loop waits
        await asyncio.sleep(0.05)
        waiting = await _loop_lag_metrics(app)
        spent = time.thread_time()
        while time.thread_time() - spent < 0.3:  # the loop computes
            pass
        await asyncio.sleep(0.05)
        busy = await _loop_lag_metrics(app)
    worst = waiting["electron:event_loop_lag_max_seconds"].samples[0].value
    # The timer was due at most one period after the loop stopped: late by 0.15 s less that.
    assert 0.15 - LOOP_LAG_INTERVAL_S - 0.005 <= worst < 1.0
    assert waiting["electron:event_loop_lag_max_cpu_seconds"].samples[0].value < 0.1
    assert waiting["electron:event_loop_lag_max_process_cpu_seconds"].samples[0].value < 0.1
    assert busy["electron:event_loop_lag_max_seconds"].samples[0].value >= 0.3
    assert busy["electron:event_loop_lag_max_cpu_seconds"].samples[0].value >= 0.28
    assert busy["electron:event_loop_lag_max_process_cpu_seconds"].samples[0].value >= 0.28
    buckets = {s.labels["le"]: s.value for s in busy["electron:event_loop_lag_seconds"]
               .samples if s.name.endswith("_bucket")}
    assert buckets["+Inf"] >= 3 and buckets["+Inf"] - buckets["0.1"] >= 2


def test_two_router_metric_sets_count_separately():
    a, b = RouterMetrics(), RouterMetrics()
    a.requests.labels("200", "electron", "none").inc()
    assert b.registry.get_sample_value("electron:requests_total",
                                       {"status": "200", "model": "electron",
                                        "plan": "none"}) is None


async def test_router_server_span_continues_the_callers_trace():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from core.telemetry import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(no_auth_config(), StaticWorkerSource([]), tracing=Tracing(provider))
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        bad = await http.post("/v1/chat/completions", content=b"{not json",
                              headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert bad.status_code == 400
        assert (await http.get("/v1/models/electron")).status_code == 200
        assert (await http.get("/health")).status_code == 200
    provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/chat/completions", "auth", "GET /v1/models/{model_id}"}
    server = spans["POST /v1/chat/completions"]
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent
    assert server.attributes["http.response.status_code"] == 400
    # The bad JSON never reached the limits.
    assert spans["auth"].parent.span_id == server.context.span_id


async def test_a_started_router_has_frozen_what_startup_made():
    """Once the app has started, the objects alive then (modules, the app, Ray's driver
    where there is one) are out of the collector's reach and young collections are rarer
    (``settle_heap``): a full collection on the event loop no longer walks them
    (docs/operations-notes.md#gc-freeze-the-heap-once-a-process-serves)."""
    gc.unfreeze()
    thresholds = gc.get_threshold()
    app = create_app(no_auth_config(), StaticWorkerSource([]))
    try:
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 10_000
            assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def test_router_processes_share_the_metrics_port(monkeypatch, tmp_path):
    """With several router processes (a shared PROMETHEUS_MULTIPROC_DIR) each binds the
    metrics port too, as the API port (SO_REUSEPORT), and answers with the pod's sum;
    without it a second bind of the port would fail the second process's start."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    first, second = RouterMetrics(), RouterMetrics()
    port = first.serve("127.0.0.1", 0)
    try:
        assert second.serve("127.0.0.1", port) == port
        async with httpx.AsyncClient() as http:
            answers = [await http.get(f"http://127.0.0.1:{port}/metrics") for _ in range(4)]
        assert {a.status_code for a in answers} == {200}
    finally:
        first.stop()
        second.stop()
