"""Traces, metrics and the dashboard against a real router (uvicorn, this process) and a real
Ray worker actor (its own process), exporting spans to a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.fleet import stop_actor
from cluster.launcher import start_local_ray
from cluster.registry import RayWorkerSource, registry_actor
from core.config import Config
from core.telemetry import tracing_from_env
from router.api.app import create_app
from tests.support.environ import SavedEnviron
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.serving import serve_router, stop_router
from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config
from workers.actor import create_worker_actor

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "electron-serve.json"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
WORKER_CHILDREN = {"queue", "prefill", "first_token", "decode", "finish"}


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    return tiny_cluster_config(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")),
                               workers=1, max_model_len=512)


@pytest.fixture(scope="module")
def otel_env(receiver):
    """The standard variables, exported before Ray starts so the worker inherits them."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
           "OTEL_BSP_SCHEDULE_DELAY": "50"}
    saved = SavedEnviron(*env, "RAY_AUTH_MODE", "PYTHONPATH")
    os.environ.update(env)
    yield env
    saved.restore()


@pytest.fixture(scope="module")
def local_ray(config, otel_env):
    start_local_ray(config)
    yield
    ray.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(local_ray, config):
    registry = registry_actor(config.cluster, detached=False)
    actor = create_worker_actor(config, "w-obs")
    await actor.ready.remote()
    yield actor
    # Bounded, as the fleet stops workers: a stop stuck exporting spans or joining the
    # engine thread must not hang the suite.
    await stop_actor("w-obs", actor, 1.0)
    ray.kill(registry)


class Router:
    def __init__(self, app, server, task, base, tracing):
        self.app, self.server, self.task, self.base, self.tracing = \
            app, server, task, base, tracing


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def router(worker, config) -> AsyncIterator[Router]:
    tracing = tracing_from_env("electron-router")
    assert tracing.enabled
    app = create_app(config, RayWorkerSource(config.cluster.namespace), tracing=tracing)
    served = await serve_router(app)
    r = Router(app, served.server, served.task, served.base, tracing)
    async with httpx.AsyncClient(base_url=r.base, timeout=60) as http:
        while not (await http.get("/ready?workers=1")).is_success:
            await asyncio.sleep(0.05)
    yield r
    await stop_router(served)
    tracing.shutdown()


@pytest_asyncio.fixture(loop_scope="session")
async def http(router) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
        yield client


def body(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "electron", "messages": [{"role": "user", "content": content}],
            "temperature": 0, **fields}


def one(spans: list[ReceivedSpan], name: str, **where: Any) -> ReceivedSpan:
    found = [s for s in spans if s.name == name
             and all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, (name, where, [(s.service, s.name) for s in spans])
    return found[0]


async def test_streamed_request_is_one_trace_across_router_and_worker(router, worker, http,
                                                                        receiver):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    async with http.stream("POST", "/v1/chat/completions",
                           json=body("Tell me a story.", stream=True, max_tokens=6,
                                     ignore_eos=True),
                           headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}) as response:
        assert response.status_code == 200
        text = "".join([chunk async for chunk in response.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]")
    router.tracing.provider.force_flush()
    await worker.flush_traces.remote()

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return {s.service for s in mine} == {"electron-router", "electron-worker"} and \
            WORKER_CHILDREN <= {s.name for s in mine if s.service == "electron-worker"} and \
            any(s.kind == CLIENT for s in mine) and \
            any(s.kind == SERVER and s.service == "electron-router" for s in mine)

    spans = [s for s in receiver.wait_for(complete) if s.trace_id == trace_id]
    router_spans = [s for s in spans if s.service == "electron-router"]
    worker_spans = [s for s in spans if s.service == "electron-worker"]

    # The router's HTTP span continues the caller's trace; its steps are its children.
    http_span = one(router_spans, "POST /v1/chat/completions", kind=SERVER)
    assert http_span.parent_span_id == parent_id
    for name in ("auth", "limits", "tokenize", "route"):
        assert one(router_spans, name).parent_span_id == http_span.span_id, name
    route = one(router_spans, "route")
    assert route.attributes["electron.routing.policy"] == "kv_aware"
    assert route.attributes["electron.routing.worker"] == "w-obs"
    assert route.attributes["electron.routing.candidates"] == 1
    assert route.attributes["electron.routing.reason"].startswith("kv_aware")
    assert "electron.routing.predicted_cached_tokens" in route.attributes
    assert one(router_spans, "tokenize").attributes["gen_ai.usage.input_tokens"] > 0
    client = one(router_spans, "electron.v1.Worker/Generate", kind=CLIENT)
    assert client.parent_span_id == http_span.span_id

    # The worker's server span is the client span's child, in the other process.
    server = one(worker_spans, "/electron.v1.Worker/Generate", kind=SERVER)
    assert server.parent_span_id == client.span_id
    a = server.attributes
    assert a["gen_ai.request.model"] == "electron"
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == 0
    assert a["gen_ai.usage.input_tokens"] == \
        one(router_spans, "tokenize").attributes["gen_ai.usage.input_tokens"]
    assert a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert "electron.cached_tokens" in a and a["electron.time_to_first_token_s"] > 0
    children = [s for s in worker_spans if s.parent_span_id == server.span_id]
    assert {s.name for s in children} == WORKER_CHILDREN
    prefill = [s for s in children if s.name == "prefill"]
    assert sum(s.attributes["electron.prefill.tokens"] for s in prefill) > 0
    queue, first, decode = (one(children, n) for n in ("queue", "first_token", "decode"))
    # Recorded by the engine thread, in order, inside the server span.
    assert server.start_ns <= queue.start_ns <= queue.end_ns <= prefill[0].start_ns
    assert prefill[-1].end_ns <= first.end_ns <= decode.end_ns <= server.end_ns
    assert decode.attributes["gen_ai.usage.output_tokens"] == 6


# -- metrics ---------------------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snapshot, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: httpx.AsyncClient, url: str) -> tuple[str, dict]:
    response = await http.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text, samples(response.text)


async def test_metrics_move_by_the_requests_served(router, worker, http):
    info = await worker.info.remote()
    worker_url = f"http://{info['metrics_address']}/metrics"
    listed = await RayWorkerSource(router.app.state.config.cluster.namespace).list_workers()
    assert [w.metrics_address for w in listed] == [info["metrics_address"]]
    _, r0 = await scrape(http, "/metrics")
    _, w0 = await scrape(http, worker_url)

    tokens, prompt = 5, None
    cached = []
    for _ in range(2):  # the same prompt twice: the second finds its blocks cached
        response = await http.post("/v1/chat/completions", json=body(
            "Count the stars in the sky, one by one, slowly. " * 3, max_tokens=tokens,
            ignore_eos=True))
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        prompt = usage["prompt_tokens"]
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert cached[1] > 0
    missing = await http.post("/v1/chat/completions", json={**body("hi"), "model": "nope"})
    assert missing.status_code == 404

    router_text, r1 = await scrape(http, "/metrics")
    worker_text, w1 = await scrape(http, worker_url)

    def moved(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(r0, r1, "electron:requests_total", status="200", model="electron",
                 plan="none") == 2
    assert moved(r0, r1, "electron:requests_total", status="404", model="other",
                 plan="none") == 1
    for name in ("electron:time_to_first_token_seconds_count",
                 "electron:router_queue_time_seconds_count"):
        assert moved(r0, r1, name) == 2, name
    assert moved(r0, r1, "electron:e2e_request_latency_seconds_count") == 3
    # One delta per token: tokens - 1 gaps per request.
    assert moved(r0, r1, "electron:inter_token_latency_seconds_count") == 2 * (tokens - 1)
    decisions = sum(v for (n, labels), v in r1.items()
                    if n == "electron:routing_decisions_total" and ("policy", "kv_aware")
                    in labels) - sum(v for (n, labels), v in r0.items()
                                     if n == "electron:routing_decisions_total")
    assert decisions == 2
    assert moved(r0, r1, "electron:routing_cached_tokens_total", policy="kv_aware") == \
        sum(cached)

    wid = {"worker_id": "w-obs"}
    assert moved(w0, w1, "electron:generation_tokens_total", **wid) == 2 * tokens
    assert moved(w0, w1, "electron:prompt_tokens_total", **wid) == 2 * prompt
    assert moved(w0, w1, "electron:prefix_cache_queries_total", **wid) == 2 * prompt
    assert moved(w0, w1, "electron:prefix_cache_hits_total", **wid) == sum(cached)
    assert moved(w0, w1, "electron:request_success_total", finished_reason="length",
                 **wid) == 2
    assert moved(w0, w1, "electron:request_queue_time_seconds_count", **wid) == 2
    # Prefill, then one step per further token (a lone request: one per step).
    assert moved(w0, w1, "electron:engine_step_duration_seconds_count", **wid) >= 2 * tokens
    assert value(w1, "electron:num_requests_running", **wid) == 0
    assert value(w1, "electron:kv_cache_blocks_total", **wid) > 0
    assert 0 < value(w1, "electron:prefix_cache_hit_ratio", **wid) <= 1

    # Every metric the dashboard queries is one that the router or a worker exposes.
    # (A family is listed with its HELP and TYPE even before any labelled series exists.)
    families = {f.name for text in (router_text, worker_text)
                for f in text_string_to_metric_families(text)}
    exposed = families | {name + suffix for name in families
                          for suffix in ("_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {m for e in exprs for m in re.findall(r"electron:[a-zA-Z0-9_:]+", e)}
    assert used and used <= exposed, used - exposed

