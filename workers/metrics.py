"""A worker's Prometheus metrics, served at ``/metrics`` by a small HTTP server per worker
process (its address is in the registry's ``WorkerEndpoint.metrics_address``).

Names follow vLLM's where the meaning is the same; every series carries ``worker_id``.
Gauges and counters are read from the engine when scraped (``EngineCollector``: nothing is
done per step for them); the step-time histogram is observed by the engine thread once per
step, the per-request histograms by the gRPC handler once per finished sequence.

- ``electron:num_requests_running`` / ``electron:num_requests_waiting``
- ``electron:kv_cache_blocks_used`` / ``electron:kv_cache_blocks_total`` and
  ``electron:kv_cache_usage_perc`` (0..1, vLLM's ``kv_cache_usage_perc``)
- ``electron:prefix_cache_queries_total`` / ``electron:prefix_cache_hits_total``: prompt tokens
  looked up in / found in the prefix cache (vLLM's); ``electron:prefix_cache_hit_ratio``:
  hits / queries since start (``rate()`` of the two gives the recent ratio)
- ``electron:prompt_tokens_total`` / ``electron:generation_tokens_total`` (``rate()``: tok/s)
- ``electron:num_preemptions_total``
- ``electron:structured_forced_close_total``: constrained sequences (JSON, tool calls) whose
  close the ``max_tokens`` budget forced (docs/structured-output.md)
- ``electron:engine_step_duration_seconds``: one forward pass with scheduling and sampling
- ``electron:request_queue_time_seconds``, ``electron:request_prefill_time_seconds``,
  ``electron:request_decode_time_seconds``: a sequence's time waiting, prefilling (first step
  to first token) and decoding (first token to finish)
- ``electron:request_success_total{finished_reason}``: finished sequences

This module imports no torch: anything with ``load()`` and ``engine.stats`` serves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0)


class EngineLike(Protocol):
    """``workers.engine.async_engine.AsyncEngine`` as far as metrics need it."""

    engine: Any  # .stats: workers.engine.stats.EngineStats

    def load(self) -> Any: ...


class EngineCollector:
    """Reads the engine's load and totals at scrape time (from the scrape thread: plain
    integer reads, which the GIL keeps whole)."""

    def __init__(self, engine: EngineLike, worker_id: str):
        self._engine = engine
        self._labels = [worker_id]

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked: the registry does not pre-register these names

    def collect(self) -> Iterator[Metric]:
        load = self._engine.load()
        stats = self._engine.engine.stats
        labels = self._labels

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["worker_id"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["worker_id"])
            family.add_metric(labels, value)
            return family

        yield gauge("electron:num_requests_running", "Sequences in the running batch",
                    load.running)
        yield gauge("electron:num_requests_waiting", "Sequences waiting to be scheduled",
                    load.waiting)
        yield gauge("electron:kv_cache_blocks_used", "KV cache blocks in use",
                    load.kv_blocks_used)
        yield gauge("electron:kv_cache_blocks_total", "KV cache blocks in the pool",
                    load.kv_blocks_total)
        total = load.kv_blocks_total
        yield gauge("electron:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)",
                    load.kv_blocks_used / total if total else 0.0)
        queries, hits = stats.prompt_tokens, stats.cached_prompt_tokens
        yield counter("electron:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                      "cache", queries)
        yield counter("electron:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                      hits)
        yield gauge("electron:prefix_cache_hit_ratio", "Prefix cache hits / queries since "
                    "start", hits / queries if queries else 0.0)
        yield counter("electron:prompt_tokens", "Prompt tokens of sequences that produced a "
                      "first token", stats.prompt_tokens)
        yield counter("electron:generation_tokens", "Generated tokens", stats.generation_tokens)
        yield counter("electron:num_preemptions", "Sequences preempted (blocks freed, "
                      "recomputed later)", stats.preemptions)
        yield counter("electron:structured_forced_close", "Constrained sequences whose close "
                      "the max_tokens budget forced (complete, finish_reason stop)",
                      stats.structured_forced_closes)


class WorkerMetrics:
    """One worker's registry and its ``/metrics`` server."""

    def __init__(self, engine: EngineLike, worker_id: str):
        self.worker_id = worker_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(EngineCollector(engine, worker_id))
        self._step = Histogram("electron:engine_step_duration_seconds",
                               "One engine step: schedule, forward pass, sample",
                               ["worker_id"], buckets=STEP_BUCKETS, registry=r
                               ).labels(worker_id)
        self.queue_time = Histogram("electron:request_queue_time_seconds",
                                    "Arrival to the first step that computed the sequence",
                                    ["worker_id"], buckets=REQUEST_BUCKETS, registry=r
                                    ).labels(worker_id)
        self.prefill_time = Histogram("electron:request_prefill_time_seconds",
                                      "First scheduled step to the first token",
                                      ["worker_id"], buckets=REQUEST_BUCKETS, registry=r
                                      ).labels(worker_id)
        self.decode_time = Histogram("electron:request_decode_time_seconds",
                                     "First token to the finish", ["worker_id"],
                                     buckets=REQUEST_BUCKETS, registry=r).labels(worker_id)
        self._success = Counter("electron:request_success", "Finished sequences",
                                ["worker_id", "finished_reason"], registry=r)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe_step(self, seconds: float) -> None:
        """One engine step took ``seconds`` (``AsyncEngine.step_observer``)."""
        self._step.observe(seconds)

    def finished(self, finish_reason: str, timeline: Any | None) -> None:
        """One sequence finished (``timeline``: its ``workers.engine.stats.Timeline``)."""
        self._success.labels(self.worker_id, finish_reason).inc()
        if timeline is None:
            return
        if timeline.scheduled_ns is not None:
            self.queue_time.observe((timeline.scheduled_ns - timeline.arrival_ns) / 1e9)
            if timeline.first_token_ns is not None:
                self.prefill_time.observe(
                    (timeline.first_token_ns - timeline.scheduled_ns) / 1e9)
        if timeline.first_token_ns is not None and timeline.finished_ns is not None:
            self.decode_time.observe((timeline.finished_ns - timeline.first_token_ns) / 1e9)

    def serve(self, host: str, port: int = 0) -> int:
        """Starts the ``/metrics`` HTTP server (a daemon thread); returns its port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
