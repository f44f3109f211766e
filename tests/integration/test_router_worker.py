"""The router in front of real workers: a real AsyncEngine (SmolLM2-135M-Instruct) behind the
real gRPC service, in this process; the router app served by uvicorn on a real socket.

The failover tests run extra gRPC servers over the same engine (one model load instead of
three): to the router each server is a separate worker with its own channel, state stream
and id, which is what they exercise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from core.config import EngineConfig, load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from core.errors import InvalidRequest, WorkerUnavailable
from core.hashing import block_hashes, extra_key
from core.pb.electron.v1 import worker_pb2 as pb
from router.api.app import create_app
from router.fleet.client import MAX_REQUEST_BYTES, WorkerClient
from tests.support.faults import FailAfterFirst, FailGenerate
from tests.support.openai_schema import validate
from tests.support.serving import Router, serve_router, stop_router
from tests.support.tenancy import local_tenancy
from workers.engine.async_engine import AsyncEngine
from workers.grpc_service import serve_worker

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL = "electron"
MAX_MODEL_LEN = 512


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(EngineConfig(kv_cache_bytes=64 * 2**20, max_model_len=MAX_MODEL_LEN,
                                   torch_threads=2), worker_id="w0")
    yield eng
    eng.shutdown()


async def start_worker(engine, worker_id: str, fault=None) -> tuple[Any, WorkerEndpoint]:
    server, port = await serve_worker(fault.wrap(engine) if fault else engine, "127.0.0.1", 0,
                                      model_id=MODEL)
    return server, WorkerEndpoint(worker_id, f"127.0.0.1:{port}", MODEL, "default")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(engine) -> AsyncIterator[WorkerEndpoint]:
    server, endpoint = await start_worker(engine, "w0")
    yield endpoint
    await server.stop(None)


async def start_router(endpoints: list[WorkerEndpoint], **router: Any) -> Router:
    config = load_config(env={}, overrides={"router": {"registry_poll_s": 0.2, **router},
                                            "auth": {"enabled": False},
                                            "tenancy": local_tenancy()})
    return await serve_router(create_app(config, StaticWorkerSource(endpoints)))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router(worker) -> AsyncIterator[Router]:
    r = await start_router([worker])
    yield r
    await stop_router(r)


@pytest_asyncio.fixture(loop_scope="module")
async def http(router) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=router.base, timeout=120) as client:
        yield client


# -- helpers ----------------------------------------------------------------------------------------

def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 8, **fields}


def sse_events(text: str) -> list[str]:
    """The data of each SSE event, checking the framing."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def stream_chunks(text: str) -> list[dict[str, Any]]:
    events = sse_events(text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        if "error" in chunk:
            validate(chunk, "ErrorResponse")
        else:
            validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


async def wait_until(condition, timeout: float, interval: float = 0.005) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout`` (for state that offers
    nothing to await: the engine's counters, the pool's membership)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def engine_idle(engine) -> bool:
    load = engine.load()
    return load.running == 0 and load.waiting == 0


# -- responses --------------------------------------------------------------------------------------

async def test_non_streaming_response_validates_against_openai_schema(http):
    response = await http.post("/v1/chat/completions", json=chat("Name a colour."),
                               headers={"X-Request-Id": "it-1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "it-1"
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


async def test_streaming_chunks_validate_and_follow_the_framing(http):
    response = await http.post("/waves/v1/chat/completions", json=chat(
        "Name a fruit.", stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    chunks = stream_chunks(response.text)
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert "cached_tokens" in usage_chunk["usage"]["prompt_tokens_details"]
    assert all(c["usage"] is None for c in choice_chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in choice_chunks]
    assert deltas[0]["role"] == "assistant"
    assert not any("role" in d for d in deltas[1:])
    assert deltas[-1] == {} and choice_chunks[-1]["choices"][0]["finish_reason"] in (
        "stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
    assert "".join(d.get("content", "") for d in deltas)


async def test_stream_without_include_usage_has_no_usage_key(http):
    response = await http.post("/v1/chat/completions",
                               json=chat("Say hi.", stream=True, max_tokens=3))
    chunks = stream_chunks(response.text)
    assert chunks and all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


async def test_second_identical_request_reports_cached_tokens(http):
    body = chat("Tell me one short fact about the planet Saturn, please.", max_tokens=2)
    first = (await http.post("/v1/chat/completions", json=body)).json()
    second = (await http.post("/v1/chat/completions", json=body)).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert cached > first["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_n_2_gives_two_choices(http):
    body = chat("Pick a number.", n=2, temperature=1.0, seed=7, max_tokens=4)
    response = (await http.post("/v1/chat/completions", json=body)).json()
    validate(response, "CreateChatCompletionResponse")
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert response["usage"]["completion_tokens"] >= 2

    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = stream_chunks(streamed.text)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")


async def test_logprobs_with_top_logprobs_3_have_the_openai_shape(http):
    body = chat("Count: one, two,", logprobs=True, top_logprobs=3, max_tokens=5,
                ignore_eos=True)
    response = (await http.post("/v1/chat/completions", json=body)).json()
    validate(response, "CreateChatCompletionResponse")
    [choice] = response["choices"]
    entries = choice["logprobs"]["content"]
    assert len(entries) == response["usage"]["completion_tokens"] == 5
    for entry in entries:
        assert entry["logprob"] <= 0 and all(0 <= b <= 255 for b in entry["bytes"])
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    # Greedy: the chosen token is the likeliest one.
    assert all(e["token"] == e["top_logprobs"][0]["token"] for e in entries)
    text = b"".join(bytes(e["bytes"]) for e in entries).decode()
    assert text == choice["message"]["content"]

    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = stream_chunks(streamed.text)
    streamed_entries = [e for c in chunks if c["choices"][0]["logprobs"]
                        for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed_entries] == [e["token"] for e in entries]


# -- the context window ----------------------------------------------------------------------------

async def test_context_too_long_is_400_context_length_exceeded(http):
    response = await http.post("/v1/chat/completions", json=chat("hello " * 600))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]


async def test_explicit_max_tokens_beyond_the_window_is_400(http):
    response = await http.post("/v1/chat/completions", json=chat("Hi", max_tokens=MAX_MODEL_LEN))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")


async def test_unset_max_tokens_is_clamped_to_the_window(http):
    body = chat("word " * 470, ignore_eos=True)  # ~500 tokens: room for ~10 more
    del body["max_tokens"]
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert usage["total_tokens"] == MAX_MODEL_LEN


# -- disconnects, leaks, sockets --------------------------------------------------------------------

async def test_client_disconnect_mid_stream_stops_the_worker_within_200ms(router, engine):
    body = chat("Write a long story about a dragon.", stream=True, max_tokens=400,
                ignore_eos=True)
    gaps = []
    async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            seen, last = 0, time.monotonic()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                if seen == 6:
                    break
            assert engine.load().running == 1
        # Leaving the block with the body unread closes the connection.
        elapsed = await wait_until(lambda: engine_idle(engine), timeout=3.0)
    # The router cancels the call within a few ms; the engine can stop only at the end of
    # the step it is running (~50 ms here when the machine is quiet). On a machine too busy to
    # run one step in 200 ms, the bound is one step: the slowest token gap just seen.
    bound = max(0.2, 1.5 * max(gaps[1:]))
    assert elapsed < bound, f"the worker kept generating for {elapsed * 1000:.0f} ms"
    # Had it not been aborted, 400 tokens would take many seconds more.
    assert engine.load().kv_blocks_used == 0


async def test_non_streaming_disconnect_also_aborts(router, engine):
    body = chat("Write a long story about a castle.", max_tokens=400, ignore_eos=True)
    async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
        request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        await wait_until(lambda: engine.load().running == 1, timeout=10)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    # Generating the 400 tokens would take many seconds.
    await wait_until(lambda: engine_idle(engine), timeout=3.0)


async def test_bad_inputs_and_disconnects_leak_no_kv_blocks(http, router, engine):
    bad = [
        chat("hello " * 600),                          # context too long
        chat("Hi", max_tokens=MAX_MODEL_LEN),          # max_tokens beyond the window
        chat("Hi", logit_bias={str(10**6): 5}),        # token id outside the vocabulary
        chat("Hi", model="other-model"),               # unknown model
        chat("Hi", temperature=9),                     # schema violation
    ]
    for body in bad:
        assert (await http.post("/v1/chat/completions", json=body)).status_code in (400, 404)
    await wait_until(lambda: engine_idle(engine), timeout=1.0)
    load = engine.load()
    # Finished requests keep their blocks only as cached, free-to-evict blocks.
    assert load.kv_blocks_used == 0
    engine.engine.scheduler.check_integrity()
    # The router's view (the worker's WatchState load reports) agrees with the engine.
    [client] = router.pool.workers()
    await wait_until(lambda: client.load.kv_blocks_used == 0 and client.load.running == 0,
                     timeout=3.0)
    assert client.in_flight == 0
    assert client.load.kv_blocks_total == load.kv_blocks_total


async def test_router_tracks_the_block_hashes_cached_on_the_worker(router, http, engine):
    messages = [{"role": "user", "content": "Which blocks of this prompt are cached now?"}]
    response = await http.post("/v1/chat/completions",
                               json={**chat(""), "messages": messages, "max_tokens": 2})
    assert response.status_code == 200
    ids = engine.tokenizer.encode_chat(messages)
    expected = set(block_hashes(ids, engine.block_size, extra_key("", engine.model_name)))
    assert expected
    [client] = router.pool.workers()
    await wait_until(lambda: expected <= client.cached_blocks.hashes, timeout=3.0)
    assert client.cached_blocks.sequence is not None


async def test_router_connections_have_tcp_nodelay(router, http):
    assert (await http.get("/health")).status_code == 200
    sockets = [c.transport.get_extra_info("socket")
               for c in router.server.server_state.connections]
    assert sockets
    assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


async def test_openai_sdk_works_on_both_base_urls(router):
    for base in ("/v1", "/waves/v1"):
        client = openai.AsyncOpenAI(base_url=router.base + base, api_key="unused")
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
            temperature=0)
        assert completion.choices[0].message.content
        assert completion.usage.prompt_tokens_details.cached_tokens is not None
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens >= 1
        await client.close()


# -- several workers --------------------------------------------------------------------------------


async def test_worker_failing_before_the_first_token_is_retried_on_another(
        engine, worker, caplog):
    failing = FailGenerate()
    bad_server, bad = await start_worker(engine, "w-bad", fault=failing)
    router = await start_router([worker, bad], policy="round_robin")
    try:
        assert sorted(router.worker_ids()) == ["w-bad", "w0"]
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            with caplog.at_level(logging.WARNING, logger="router.chat.service"):
                plain = [await client.post("/v1/chat/completions", json=chat("Hi", max_tokens=2))
                         for _ in range(2)]
                streamed = [await client.post("/v1/chat/completions",
                                              json=chat("Hi", max_tokens=2, stream=True))
                            for _ in range(2)]
        assert [r.status_code for r in plain + streamed] == [200] * 4
        for r in streamed:
            assert not any("error" in c for c in stream_chunks(r.text))
        assert failing.calls >= 2
        assert sum("retrying on another worker" in m for m in caplog.messages) == failing.calls
    finally:
        await stop_router(router)
        await bad_server.stop(None)


async def test_a_request_that_cannot_be_sampled_fails_alone_unretried_and_uncounted(
        engine, worker, caplog):
    # Issue 13, finding 3: one tenant's row that cannot be sampled (NaN logits here, as
    # temperature 1e-40 made them) fails that request alone, as a 400; the request beside it
    # in the batch goes on; the router neither retries it elsewhere nor counts it against
    # the worker's circuit breaker.
    poison = 131_313
    real = engine.engine.sampler

    def poisoned(logits, requests):
        for i, r in enumerate(requests):
            if r.sampling.seed == poison:
                logits[i, 42] = float("nan")
        return real(logits, requests)

    other_server, other = await start_worker(engine, "w1")
    router = await start_router([worker, other], policy="round_robin")
    breaker_failures: list[str] = []
    router.pool.breaker.failed = breaker_failures.append
    engine.engine.sampler = poisoned
    try:
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            with caplog.at_level(logging.WARNING, logger="router.chat.service"):
                bad, good, tiny_t, greedy = await asyncio.gather(
                    client.post("/v1/chat/completions",
                                json=chat("Hi", seed=poison, temperature=0.7)),
                    client.post("/v1/chat/completions",
                                json=chat("Count to ten.", max_tokens=24, stream=True)),
                    client.post("/v1/chat/completions",
                                json=chat("Name a colour.", temperature=1e-40)),
                    client.post("/v1/chat/completions",
                                json=chat("Name a colour.", temperature=0)))
                streamed_bad = await client.post(
                    "/v1/chat/completions", json=chat("Hi", seed=poison, temperature=0.7,
                                                      stream=True))
        for response in (bad, streamed_bad):
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert "could not be sampled" in error["message"]
        assert good.status_code == 200
        chunks = stream_chunks(good.text)
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert tiny_t.status_code == greedy.status_code == 200
        assert (tiny_t.json()["choices"][0]["message"]["content"]
                == greedy.json()["choices"][0]["message"]["content"])
        assert not any("retrying on another worker" in m for m in caplog.messages)
        assert breaker_failures == []
    finally:
        engine.engine.sampler = real
        await stop_router(router)
        await other_server.stop(None)
    await wait_until(lambda: engine_idle(engine), 10)


async def test_only_worker_failing_is_503_worker_unavailable(engine):
    failing = FailGenerate()
    bad_server, bad = await start_worker(engine, "w-bad", fault=failing)
    router = await start_router([bad])
    try:
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            response = await client.post("/v1/chat/completions", json=chat("Hi"))
        assert response.status_code == 503
        body = response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["code"] == "worker_unavailable" and failing.calls == 1
        # Which worker failed, where, and what gRPC said are the log's, not the client's.
        for secret in ("w-bad", bad.address, "injected failure", "UNAVAILABLE", "INTERNAL"):
            assert secret not in response.text
    finally:
        await stop_router(router)
        await bad_server.stop(None)


async def test_a_stream_error_event_names_no_worker_address_or_peer(engine):
    leak = "ipv4:10.42.3.17:40521: Connection reset by peer (stream 7)"
    server, endpoint = await start_worker(engine, "w-secret-7", fault=FailAfterFirst(leak))
    router = await start_router([endpoint])
    try:
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            response = await client.post("/v1/chat/completions",
                                         json=chat("Count to ten.", max_tokens=24, stream=True))
        assert response.status_code == 200  # the first chunk had left: the error is an event
        chunks = stream_chunks(response.text)
        assert "error" not in chunks[0] and chunks[-1]["error"]["code"] == "worker_unavailable"
        for secret in ("w-secret-7", endpoint.address, "10.42.3.17", "ipv4",
                       "Connection reset", "UNAVAILABLE", "INTERNAL"):
            assert secret not in response.text
    finally:
        await stop_router(router)
        await server.stop(None)


async def test_stopped_worker_leaves_routing_within_2s_and_requests_keep_succeeding(
        engine, worker, caplog):
    other_server, other = await start_worker(engine, "w1")
    router = await start_router([worker, other], policy="round_robin")
    try:
        assert sorted(router.worker_ids()) == ["w0", "w1"]
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            warm = [await client.post("/v1/chat/completions", json=chat("Hi", max_tokens=2))
                    for _ in range(2)]
            assert [r.status_code for r in warm] == [200, 200]
            # Killed, not drained: every call and stream of that server is cut at once.
            await other_server.server.stop(None)
            gone = await wait_until(lambda: router.worker_ids() == ["w0"], timeout=2.0)
            assert gone < 2.0
            with caplog.at_level(logging.WARNING, logger="router.chat.service"):
                after = [await client.post("/v1/chat/completions",
                                           json=chat("Hi", max_tokens=2)) for _ in range(4)]
        assert [r.status_code for r in after] == [200] * 4
        # No request went to the dead worker first (the pool's own reconnect attempts to it
        # also log "retrying", so only the chat service's failover records count).
        assert not any("retrying on another worker" in r.getMessage() for r in caplog.records
                       if r.name == "router.chat.service")
    finally:
        await stop_router(router)
        await other_server.stop(None)


async def test_a_burst_spreads_over_idle_workers_before_any_load_report(engine, worker):
    other_server, other = await start_worker(engine, "w1")
    # least_load: its only signal here is the router's own in-flight count. (kv_aware would
    # rightly send two identical prompts together: the first one's pending blocks.)
    router = await start_router([worker, other], policy="least_load")
    body = chat("Tell me a long story.", stream=True, max_tokens=200, ignore_eos=True)
    try:
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            streams = [client.stream("POST", "/v1/chat/completions", json=body)
                       for _ in range(2)]
            # Both requests are routed before either worker reports any load.
            responses = await asyncio.gather(*(s.__aenter__() for s in streams))
            try:
                assert [r.status_code for r in responses] == [200, 200]
                assert sorted(w.in_flight for w in router.pool.workers()) == [1, 1]
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)
        await wait_until(lambda: all(w.in_flight == 0 for w in router.pool.workers()),
                         timeout=3.0)
        await wait_until(lambda: engine_idle(engine), timeout=3.0)
    finally:
        await stop_router(router)
        await other_server.stop(None)


# -- structured output within max_tokens ---------------------------------------------------------

ESSAY = {"type": "json_schema", "json_schema": {"name": "essay", "strict": True, "schema": {
    "type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
    "required": ["title", "body"], "additionalProperties": False}}}


async def test_max_tokens_below_the_schemas_shortest_output_is_400(http):
    response = await http.post("/v1/chat/completions", json=chat(
        "Write an essay.", max_tokens=3, response_format=ESSAY))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "max_tokens")
    assert "at least" in error["message"]


async def test_a_reply_closed_by_the_budget_is_complete_and_says_so(http):
    body = chat("Write a long essay about the sea, with a long title.", max_tokens=14,
                temperature=1, seed=7, response_format=ESSAY)
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    validate(reply, "CreateChatCompletionResponse")
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert set(json.loads(choice["message"]["content"])) == {"title", "body"}
    assert reply["usage"]["structured_forced_close"] == 1
    assert response.headers["x-electron-structured-forced-close"] == "1"
    streamed = await http.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = stream_chunks(streamed.text)
    assert chunks[-1]["usage"]["structured_forced_close"] == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]  # same seed, same reply


# -- the Session under the router's requests ---------------------------------------------------------

def wire_request(token_ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=f"s-{uuid.uuid4().hex}", token_ids=token_ids,
                              model=MODEL, sampling=pb.SamplingParams(
                                  temperature=0, max_tokens=max_tokens, ignore_eos=True))


async def test_a_broken_session_ends_every_request_on_it_and_the_next_one_reconnects(engine):
    server, endpoint = await start_worker(engine, "w-session")
    client = WorkerClient(endpoint)
    try:
        await client.connect()
        long = [await client.generate(wire_request([5, 6, 7, 8 + i], MAX_MODEL_LEN - 8))
                for i in range(2)]
        for stream in long:
            assert (await anext(stream)).text is not None
        port = int(endpoint.address.rpartition(":")[2])
        await server.server.stop(None)  # killed: its Session breaks under both requests
        for stream in long:
            with pytest.raises(WorkerUnavailable):
                async with asyncio.timeout(5):
                    async for _ in stream:
                        pass
        await wait_until(lambda: engine_idle(engine), timeout=5.0)
        # A worker back on the same address: the next request opens a new Session.
        server, _ = await serve_worker(engine, "127.0.0.1", port, model_id=MODEL)
        async with asyncio.timeout(10):
            while True:
                try:
                    stream = await client.generate(wire_request([9, 10, 11], 3))
                    messages = [m async for m in stream]
                    break
                except WorkerUnavailable:
                    await asyncio.sleep(0.1)  # the channel is still reconnecting
        assert messages[-1].finish_reason == "length"
    finally:
        await client.close()
        await server.stop(None)


async def test_a_request_too_large_for_the_wire_is_refused_alone(engine, worker):
    client = WorkerClient(worker)
    try:
        await client.connect()
        huge = wire_request([2**31] * (MAX_REQUEST_BYTES // 5 + 1), 4)
        with pytest.raises(InvalidRequest, match="too large"):
            await client.generate(huge)
        messages = [m async for m in await client.generate(wire_request([5, 6, 7], 2))]
        assert messages[-1].finish_reason == "length"
    finally:
        await client.close()
