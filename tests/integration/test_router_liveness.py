"""The router's side of liveness, against a real worker (the tiny random-weight Llama behind
the real gRPC service, in this process) and the router app on a real socket: a request queued
behind others is not a failure (no retry, no breaker count), and a stream that falls silent
after its first delta ends with an error event, the worker aborts it and every slot it held
is given back."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from core.config import load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from router.api.app import create_app
from router.fleet.breaker import BreakerState
from tests.integration.test_liveness import slow_steps
from tests.support.faults import GateGenerate
from tests.support.serving import Router, serve_router, stop_router
from tests.support.tenancy import local_tenancy
from tests.support.tiny_model import make_tiny_llama_dir, tiny_engine
from workers.grpc_service import serve_worker

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL = "electron"
KEY = "sk-liveness-test-key"
PROGRESS_S = 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def engine(model_dir):
    # One sequence at a time, so a second request queues behind the first.
    eng = tiny_engine(model_dir, model_id=MODEL, max_num_seqs=1,
                      progress_interval_s=PROGRESS_S)
    yield eng
    eng.shutdown()


async def start_stack(model_dir, engine, fault=None, send_buffer: int | None = None,
                      **router: Any) -> tuple[Any, Router]:
    server, port = await serve_worker(fault.wrap(engine) if fault else engine, "127.0.0.1", 0,
                                      model_id=MODEL)
    endpoint = WorkerEndpoint("w0", f"127.0.0.1:{port}", MODEL, "default")
    config = load_config(env={}, overrides={
        "engine": {"model": str(model_dir), "progress_interval_s": PROGRESS_S},
        "router": {"registry_poll_s": 0.2, "model_id": MODEL, **router},
        "auth": {"enabled": True, "static_keys": [KEY]},
        "tenancy": local_tenancy()})
    return server, await serve_router(create_app(config, StaticWorkerSource([endpoint])),
                                      send_buffer=send_buffer)


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[Any]:
    def client(router: Router) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=router.base, timeout=20,
                                 headers={"Authorization": f"Bearer {KEY}"})
    yield client


def chat(max_tokens: int, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0, "max_tokens": max_tokens, **fields}


async def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.02)


async def test_a_request_queued_past_the_first_token_timeout_is_served_not_failed(
        model_dir, engine, http):
    slow_steps(engine, 0.02)  # the first request runs ~2 s; the second waits behind it
    server, router = await start_stack(model_dir, engine, first_token_timeout_s=0.5,
                                       breaker_failures=1)
    try:
        async with http(router) as client:
            async with client.stream("POST", "/v1/chat/completions",
                                     json=chat(100, stream=True)) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()
                await anext(lines)  # the first chunk: it holds the engine's only slot
                started = time.monotonic()
                queued = await client.post("/v1/chat/completions", json=chat(4))
                waited = time.monotonic() - started
                async for _ in lines:
                    pass
        assert queued.status_code == 200, queued.text
        assert waited > 0.5, "the request did not queue past the first-token timeout"
        assert queued.json()["usage"]["completion_tokens"] == 4
        # Not counted against the worker (one failure would have opened its circuit).
        assert router.pool.breaker.state("w0") is BreakerState.CLOSED
    finally:
        await stop_router(router)
        await server.stop(None)


async def test_a_stream_silent_after_its_first_delta_ends_and_gives_everything_back(
        model_dir, engine, http):
    slow_steps(engine, 0.05)  # left alone the request would run ~5 s
    gate = GateGenerate()  # the worker's stream goes silent after its first message
    server, router = await start_stack(model_dir, engine, fault=gate,
                                       stream_stall_timeout_s=0.5)
    try:
        async with http(router) as client:
            started = time.monotonic()
            async with client.stream("POST", "/v1/chat/completions",
                                     json=chat(100, stream=True)) as response:
                assert response.status_code == 200
                body = "".join([part async for part in response.aiter_text()])
            took = time.monotonic() - started
        events = [e.removeprefix("data: ") for e in body.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        # The stall limit ended it (the body tells no internal detail; the log says "sent
        # nothing for 0.5 s"), well before the ~5 s the request would have run.
        assert error["code"] == "worker_unavailable"
        assert took < 3.0
        # The call was cancelled (the worker aborted the request), the lease and the
        # tenant's concurrency slot were released.
        await wait_until(lambda: gate.held == 0, 2.0)
        await wait_until(lambda: engine.load().running + engine.load().waiting == 0, 2.0)
        [worker] = router.pool.workers()
        assert worker.local.in_flight == 0
        limiter = router.app.state.tenancy.limiter
        await wait_until(lambda: limiter.in_flight("local") == 0, 2.0)
    finally:
        await stop_router(router)
        await server.stop(None)


async def test_a_stream_whose_client_stops_reading_is_aborted_billed_and_released(
        model_dir, engine):
    slow_steps(engine, 0.02)  # left alone the request would run ~5 s
    server, router = await start_stack(model_dir, engine, client_write_timeout_s=0.5,
                                       send_buffer=4096)
    ledger = router.app.state.tenancy.ledger
    rows: list[Any] = []
    record = ledger.record
    ledger.record = lambda row: (rows.append(row), record(row))  # type: ignore[method-assign]
    # A real client that sends a streaming request and never reads: small socket buffers on
    # both ends, so the router's writes soon wait (each chunk carries 20 top logprobs:
    # ~1 KB; past the buffers' ~80 KB, with the transport's 64 KB).
    host, port = router.base.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        body = json.dumps(chat(200, stream=True, ignore_eos=True, logprobs=True,
                               top_logprobs=20)).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        await asyncio.get_running_loop().sock_sendall(sock, head + body)
        await wait_until(lambda: engine.load().running == 1, 5.0)
        started = time.monotonic()
        # The worker stops the request and the slot comes back within the write timeout
        # (plus the time to fill the buffers), long before the ~5 s it would have run.
        await wait_until(lambda: engine.load().running + engine.load().waiting == 0, 3.0)
        limiter = router.app.state.tenancy.limiter
        await wait_until(lambda: limiter.in_flight("local") == 0, 1.0)
        assert time.monotonic() - started < 3.0
        [worker] = router.pool.workers()
        assert worker.local.in_flight == 0
        [row] = rows
        assert row.status == "incomplete"
        # Billed for what was written, not for the 200 tokens asked.
        assert 0 < row.completion_tokens < 200
    finally:
        sock.close()
        await stop_router(router)
        await server.stop(None)
