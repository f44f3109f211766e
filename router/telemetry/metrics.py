"""The router's Prometheus metrics, served at ``GET /metrics``: on the API port, or with
``router.metrics_port`` on a port of their own (``RouterMetrics.serve``), the API port then
serving none.

Names follow vLLM's where the meaning is the same (``vllm:time_to_first_token_seconds`` ->
``electron:time_to_first_token_seconds``, ...). Each app owns its ``CollectorRegistry``, so two
routers in one process (tests) count separately.

Seen from the router (the client's view, network and queueing included):
- ``electron:requests_total{status,model,plan}``: chat-completion requests by HTTP status;
  ``plan`` is the tenant's plan (``request.state.principal.plan.name``), "none" without one;
- ``electron:time_to_first_token_seconds``: HTTP arrival -> the worker's first delta;
- ``electron:inter_token_latency_seconds``: between consecutive deltas of a request;
- ``electron:e2e_request_latency_seconds``: HTTP arrival -> the response's last byte;
- ``electron:router_queue_time_seconds``: HTTP arrival -> the Generate call is sent (auth,
  limits, templating, tokenization, routing, waiting for a channel slot);
- ``electron:routing_decisions_total{policy,reason}``: each worker choice (a retry is one more);
- ``electron:routing_predicted_cached_tokens_total{policy}`` and
  ``electron:routing_cached_tokens_total{policy}``: the prefix the policy expected the chosen
  worker to hold, and what the worker then reported (a finished request's ``cached_tokens``);
- ``electron:rate_limit_rejections_total{plan,limit}``: 429s from the limits
  (``record_rate_limit_rejection``);
- ``electron:ledger_quarantined_rows_total``: usage rows the database refused, written to the
  ledger's dead-letter file instead (router/tenancy/ledger.py); anything above 0 needs a look;
- ``electron:event_loop_lag_seconds`` and ``electron:event_loop_lag_max_seconds``: how late a
  timer the router sets every ``LOOP_LAG_INTERVAL_S`` fires (``watch_loop_lag``): the time
  the event loop could not run, whether busy with one callback, waiting for the GIL or for a
  CPU; the worst since the router started, and ``electron:event_loop_lag_max_cpu_seconds``
  the CPU time the loop's thread used in that worst interval: near the interval's length, the
  loop was busy (our code); far below it, it was waiting: for the GIL when the process's
  other threads used the time (``electron:event_loop_lag_max_process_cpu_seconds``, all
  threads), for a free core when they did not either.

With several router processes on one port (``router --processes N``) a scrape reaches one of
them, so they keep their samples in files under ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor
sets it: cluster/router_processes.py) and each renders the sum over all of them
(prometheus_client's multiprocess mode; counters and histograms only, which sum). With
``router.metrics_port`` every process binds that port too (SO_REUSEPORT, like the API port)
and answers with the same sum.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import (
    CONTENT_TYPE_LATEST,
    ThreadingWSGIServer,
    make_wsgi_app,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

NO_PLAN = "none"
OTHER_MODEL = "other"  # a model id the router does not serve (bounded label values)
# Seconds; vLLM's TTFT / e2e buckets, trimmed.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
# The lag timer's period: often enough to see a stall of a few ms, cheap (~100 wakeups/s).
LOOP_LAG_INTERVAL_S = 0.01
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: WSGIServer | None = None  # with router.metrics_port
        r = self.registry
        self.requests = Counter("electron:requests", "Chat-completion requests by HTTP status",
                                ["status", "model", "plan"], registry=r)
        self.ttft = Histogram("electron:time_to_first_token_seconds",
                              "HTTP arrival to the first delta from the worker",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("electron:inter_token_latency_seconds",
                             "Time between consecutive deltas of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("electron:e2e_request_latency_seconds",
                             "HTTP arrival to the last byte of the response",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("electron:router_queue_time_seconds",
                               "HTTP arrival until the Generate call is sent",
                               buckets=QUEUE_BUCKETS, registry=r)
        self.routing = Counter("electron:routing_decisions", "Worker choices by policy and reason",
                               ["policy", "reason"], registry=r)
        self.predicted_cached = Counter(
            "electron:routing_predicted_cached_tokens",
            "Prompt tokens the policy expected the chosen worker to hold", ["policy"], registry=r)
        self.actual_cached = Counter(
            "electron:routing_cached_tokens",
            "Prompt tokens the chosen worker reported cached", ["policy"], registry=r)
        self.rate_limited = Counter("electron:rate_limit_rejections",
                                    "Requests refused by a rate or concurrency limit (429)",
                                    ["plan", "limit"], registry=r)
        self.ledger_quarantined = Counter(
            "electron:ledger_quarantined_rows",
            "Usage rows the database refused, kept in the ledger's dead-letter file",
            registry=r)
        self.loop_lag = Histogram("electron:event_loop_lag_seconds",
                                  "How late the router's periodic event-loop timer fired",
                                  buckets=LOOP_LAG_BUCKETS, registry=r)
        self.loop_lag_max = Gauge("electron:event_loop_lag_max_seconds",
                                  "The worst event-loop lag since the router started",
                                  registry=r)
        self.loop_lag_max_cpu = Gauge(
            "electron:event_loop_lag_max_cpu_seconds",
            "CPU time of the event loop's thread during its worst lag interval", registry=r)
        self.loop_lag_max_process_cpu = Gauge(
            "electron:event_loop_lag_max_process_cpu_seconds",
            "CPU time of the whole router process during the loop's worst lag interval",
            registry=r)
        self._worst_lag = 0.0

    async def watch_loop_lag(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Runs until cancelled: sleeps ``interval_s`` at a time and records how much later
        than asked the loop woke it."""
        loop = asyncio.get_running_loop()
        while True:
            start, cpu, process_cpu = loop.time(), time.thread_time(), time.process_time()
            await asyncio.sleep(interval_s)
            lag = max(0.0, loop.time() - start - interval_s)
            self.loop_lag.observe(lag)
            if lag > self._worst_lag:
                self._worst_lag = lag
                self.loop_lag_max.set(lag)
                self.loop_lag_max_cpu.set(time.thread_time() - cpu)
                self.loop_lag_max_process_cpu.set(time.process_time() - process_cpu)

    def serve(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` (a daemon thread: counters and histograms are
        thread-safe); returns the port bound. OSError when it cannot bind."""
        if not os.environ.get(MULTIPROC_DIR_ENV):
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            return int(self._server.server_address[1])
        # Every router process of the pod serves the port, each the sum over all of them.
        server = make_server(host, port, make_wsgi_app(self._exposed()), _ReusePortServer,
                             handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type: every router process's samples summed
        when they share a ``PROMETHEUS_MULTIPROC_DIR``."""
        return generate_latest(self._exposed()), CONTENT_TYPE_LATEST

    def _exposed(self) -> CollectorRegistry:
        shared = os.environ.get(MULTIPROC_DIR_ENV)
        if not shared:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, shared)
        return registry


class _ReusePortServer(ThreadingWSGIServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """No line per scrape on stderr."""


def plan_of(principal: Any) -> str:
    """The plan label of a request's principal (issue 5's ``request.state.principal``)."""
    plan = getattr(principal, "plan", None)
    name = getattr(plan, "name", None) if plan is not None else None
    return str(name) if name else NO_PLAN


def record_rate_limit_rejection(request: Any, limit: str) -> None:
    """Counts one request refused by a limit (``limit``: "rpm", "concurrency", "tpm", ...).
    ``request`` is the Starlette request; its principal gives the plan."""
    metrics: RouterMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        principal = getattr(request.state, "principal", None)
        metrics.rate_limited.labels(plan_of(principal), limit).inc()
