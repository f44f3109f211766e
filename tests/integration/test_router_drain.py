"""A router stopped by SIGTERM with streams open (the launcher's signal handler and stop path,
as `electron-serve router` and `up` run them), against a real worker (the tiny random-weight Llama behind the real gRPC service, in this
process) and the router served by the launcher's uvicorn server on a real socket: /ready is
503 at once and new requests are refused, a stream that ends within the drain time finishes,
a longer one ends with an error event (a response built whole with a 503), each has its
ledger row, every slot is released and the stop takes the drain time plus a small margin."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from cluster.launcher import _stop_event, _until, router_server, stop_router
from core.config import load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from router.api.app import create_app
from router.api.drain import CUT_GRACE_S
from router.api.server import listen_socket
from tests.integration.test_liveness import slow_steps
from tests.support.tenancy import local_tenancy
from tests.support.tiny_model import make_tiny_llama_dir, tiny_engine
from workers.grpc_service import serve_worker

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL = "electron"
KEY = "sk-drain-test-key-0001"
DRAIN_S = 1.5
STEP_S = 0.05  # every forward pass: a 12-token stream ends in ~0.6 s, a 200-token one ~10 s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def engine(model_dir):
    eng = tiny_engine(model_dir, model_id=MODEL, max_num_seqs=4)
    slow_steps(eng, STEP_S)
    yield eng
    eng.shutdown()


def chat(max_tokens: int, stream: bool = True) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "temperature": 0, "max_tokens": max_tokens}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def events(body: str) -> list[str]:
    return [e.removeprefix("data: ") for e in body.strip().split("\n\n")]


async def test_a_stopping_router_drains_then_cuts_with_an_error_and_loses_nothing(
        model_dir, engine, tmp_path):
    worker, port = await serve_worker(engine, "127.0.0.1", 0, model_id=MODEL)
    config = load_config(env={}, overrides={
        "engine": {"model": str(model_dir)},
        "router": {"model_id": MODEL, "drain_timeout_s": DRAIN_S},
        "auth": {"enabled": True, "static_keys": [KEY]},
        "tenancy": local_tenancy(tmp_path)})
    app = create_app(config, StaticWorkerSource(
        [WorkerEndpoint("w0", f"127.0.0.1:{port}", MODEL, "default")]))
    sock = listen_socket("127.0.0.1", 0)
    server = router_server(app, config, "warning")
    task = asyncio.create_task(server.serve(sockets=[sock]))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        while not server.started:
            assert not task.done(), "uvicorn exited during startup"
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as client:
            ready = await client.get("/ready?workers=1")
            assert ready.status_code == 200, ready.text
            async with client.stream("POST", "/v1/chat/completions", json=chat(12)) as short, \
                    client.stream("POST", "/v1/chat/completions", json=chat(200)) as long:
                assert short.status_code == long.status_code == 200
                short_parts, long_parts = short.aiter_text(), long.aiter_text()
                short_body, long_body = await anext(short_parts), await anext(long_parts)
                # A response built whole, still running when the drain time ends.
                whole = asyncio.create_task(client.post("/v1/chat/completions",
                                                        json=chat(200, stream=False)))
                await asyncio.sleep(0.2)

                stop = _stop_event()  # the launcher's SIGTERM/SIGINT handler

                async def run_router() -> None:  # the end of launcher.run_router
                    await _until(stop, asyncio.shield(task))
                    await stop_router(server, task, DRAIN_S)

                stopping = asyncio.create_task(run_router())
                started = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.05)
                # A fresh connection each: the listener stays open while the router drains.
                async with httpx.AsyncClient(base_url=base, timeout=5,
                                             headers=headers) as probe:
                    not_ready = await probe.get("/ready")
                    refused = await probe.post("/v1/chat/completions", json=chat(4))
                assert not_ready.status_code == 503
                assert not_ready.json()["error"]["code"] == "shutting_down"
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "shutting_down"
                assert refused.headers["Retry-After"] == "1"

                short_body += "".join([part async for part in short_parts])
                long_body += "".join([part async for part in long_parts])
                long_ended = time.monotonic() - started
            cut_whole = await whole
            await stopping
            took = time.monotonic() - started
    finally:
        if not task.done():
            server.should_exit = True
            await asyncio.gather(task, return_exceptions=True)
        sock.close()
        await worker.stop(None)

    # The short stream finished as usual: its usage chunk, [DONE], no error.
    short_events = events(short_body)
    assert short_events[-1] == "[DONE]"
    assert json.loads(short_events[-2])["usage"]["completion_tokens"] == 12
    assert not any('"error"' in e for e in short_events)
    # The long one was cut when the drain time ran out: an error event, then [DONE].
    long_events = events(long_body)
    assert long_events[-1] == "[DONE]"
    assert json.loads(long_events[-2])["error"]["code"] == "shutting_down"
    assert DRAIN_S - 0.2 < long_ended < DRAIN_S + 1.0
    assert took < DRAIN_S + CUT_GRACE_S
    # The whole response could not finish: the same error, as a 503 the client may retry.
    assert cut_whole.status_code == 503
    assert cut_whole.json()["error"]["code"] == "shutting_down"

    # Every slot given back, the worker's call cancelled (it aborts the request).
    assert app.state.tenancy.limiter.in_flight("local") == 0
    assert app.state.drain.open_requests == 0
    for _ in range(100):
        if engine.load().running + engine.load().waiting == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.load().running + engine.load().waiting == 0
    # One ledger row per stream, written before the router exited; none for the refusal.
    with sqlite3.connect(Path(tmp_path) / "electron.db") as db:
        rows = db.execute("SELECT status, completion_tokens FROM usage_ledger").fetchall()
    assert sorted(status for status, _ in rows) == ["error", "incomplete", "ok"]
    billed = dict(rows)
    assert billed["ok"] == 12
    assert 0 < billed["incomplete"] < 200
