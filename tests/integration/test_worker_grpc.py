"""The worker's gRPC service over a real socket, in front of a real AsyncEngine (a tiny
random-weight Llama): streaming, error mapping, cancellation, KV events, health."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import EngineConfig
from core.hashing import block_hashes, extra_key
from core.pb.electron.v1 import worker_pb2 as pb
from core.pb.electron.v1 import worker_pb2_grpc as pb_grpc
from core.protocol import ERROR_METADATA_KEY, WORKER_SERVICE
from tests.support.schemas import schema_spec, tool_spec
from tests.support.tiny_model import make_tiny_llama_dir
from workers import grpc_service
from workers.engine.async_engine import AsyncEngine
from workers.grpc_service import serve_worker

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_MODEL_LEN = 2048
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))
    eng = AsyncEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                   kv_cache_bytes=8 * 2**20, max_model_len=MAX_MODEL_LEN,
                                   max_num_batched_tokens=64, torch_threads=1),
                      worker_id="grpc-test-worker")
    yield eng
    eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def address(engine):
    server, port = await serve_worker(engine, "127.0.0.1", 0, model_id="electron",
                                      pool="test")
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest_asyncio.fixture(loop_scope="session")
async def channel(address):
    async with grpc.aio.insecure_channel(address) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return pb_grpc.WorkerStub(channel)


def prompt(engine, length: int) -> list[int]:
    """Distinct token ids (never the model's special ones), different on every call."""
    start = 3 + next(_ids) * 7
    usable = engine.vocab_size - 3
    return [3 + (start + i * 13) % usable for i in range(length)]


def request(token_ids, *, max_tokens: int = 4, salt: str = "", **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=f"req-{next(_ids)}", token_ids=token_ids, cache_salt=salt, model="electron",
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                   **sampling))


async def until(condition, timeout: float = 2.0) -> None:
    """Waits for ``condition()`` (a state of another thread) up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def electron_error(exc: grpc.aio.AioRpcError) -> dict:
    return json.loads(dict(exc.trailing_metadata())[ERROR_METADATA_KEY])


async def test_generate_streams_deltas_then_a_final_message_with_usage(engine, stub):
    ids = prompt(engine, 20)
    messages = [m async for m in stub.Generate(request(ids, max_tokens=6))]
    *deltas, final = messages
    assert all(m.finish_reason == "" and not m.HasField("usage") for m in deltas)
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == 20
    assert final.usage.completion_tokens == 6
    assert sum(len(m.token_ids) for m in messages) == 6
    assert all(0 <= t < engine.vocab_size for m in messages for t in m.token_ids)


async def test_identical_request_reports_cached_prompt_tokens(engine, stub):
    ids = prompt(engine, 40)
    first = [m async for m in stub.Generate(request(ids, salt="cached"))][-1]
    second = [m async for m in stub.Generate(request(ids, salt="cached"))][-1]
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == (40 - 1) // engine.block_size * engine.block_size


@pytest.mark.parametrize("case, param, code", [
    ("token outside the vocabulary", "token_ids", None),
    ("empty prompt", "token_ids", None),
    ("prompt longer than the context", "messages", "context_length_exceeded"),
    ("temperature out of range", "temperature", None),
    ("another model", "model", "model_not_found"),
    ("uncompilable grammar", "response_format", None),
    ("grammar of no kind", "response_format", None),
    ("grammar naming an undeclared tool", "tool_choice", None),
])
async def test_bad_request_is_invalid_argument_naming_the_field(engine, stub, case, param, code):
    req = request(prompt(engine, 8))
    if case == "token outside the vocabulary":
        req.token_ids[3] = engine.vocab_size
    elif case == "empty prompt":
        del req.token_ids[:]
    elif case == "prompt longer than the context":
        req.token_ids[:] = prompt(engine, MAX_MODEL_LEN + 1)
    elif case == "temperature out of range":
        req.sampling.temperature = 2.5
    elif case == "uncompilable grammar":
        req.sampling.grammar.CopyFrom(schema_spec({"type": "nope"}))
    elif case == "grammar of no kind":
        req.sampling.grammar.SetInParent()
    elif case == "grammar naming an undeclared tool":
        req.sampling.grammar.CopyFrom(tool_spec("named", "launch_rocket"))
    else:
        req.model = "some-other-model"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [m async for m in stub.Generate(req)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body = electron_error(info.value)
    assert body["type"] == "invalid_request_error"
    assert body["param"] == param
    assert body["code"] == code
    assert body["message"] == info.value.details()


async def test_a_grammar_makes_even_random_weights_write_valid_json(engine, stub):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    req = request(prompt(engine, 12), max_tokens=40)
    req.sampling.ignore_eos = False
    req.sampling.grammar.CopyFrom(schema_spec(schema))
    messages = [m async for m in stub.Generate(req)]
    assert messages[-1].finish_reason == "stop"
    value = json.loads("".join(m.text for m in messages))
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9


async def test_cancelling_the_call_aborts_the_request_and_frees_its_blocks(engine, stub):
    baseline = engine.load()
    assert baseline.running == 0
    call = stub.Generate(request(prompt(engine, 40), max_tokens=MAX_MODEL_LEN - 41))
    for _ in range(2):
        message = await call.read()
        assert message.finish_reason == ""
    assert engine.load().running == 1
    assert engine.load().kv_blocks_used > baseline.kv_blocks_used
    call.cancel()
    await until(lambda: engine.load().running == 0
                and engine.load().kv_blocks_used == baseline.kv_blocks_used)
    assert call.cancelled()


async def test_abort_rpc_ends_the_stream_with_finish_reason_abort(engine, stub):
    req = request(prompt(engine, 10), max_tokens=MAX_MODEL_LEN - 11)
    call = stub.Generate(req)
    await call.read()
    assert (await stub.Abort(pb.AbortRequest(request_id=req.request_id))).found
    while (message := await call.read()) is not grpc.aio.EOF:
        last = message
    assert last.finish_reason == "abort"
    assert not (await stub.Abort(pb.AbortRequest(request_id=req.request_id))).found


async def test_watch_state_sends_a_snapshot_then_the_blocks_a_request_stored(engine, stub):
    updates = stub.WatchState(pb.WatchStateRequest())
    first = await updates.read()
    assert first.WhichOneof("update") == "snapshot"
    assert first.snapshot.block_size == engine.block_size

    salt = "watch-state"
    ids = prompt(engine, 3 * engine.block_size + 5)
    [m async for m in stub.Generate(request(ids, salt=salt))]
    # The router computes the same hashes from the same tokens: that is the contract.
    expected = set(block_hashes(ids, engine.block_size, extra_key(salt, engine.model_name)))

    stored: set[int] = set()
    sequence = first.snapshot.sequence
    saw_load = False
    async with asyncio.timeout(5):
        while not expected <= stored:
            update = await updates.read()
            kind = update.WhichOneof("update")
            if kind == "load":
                saw_load = True
                assert update.load.kv_blocks_total == engine.load().kv_blocks_total
            elif kind == "event":
                assert update.event.sequence == sequence + 1, "events are consecutive"
                sequence = update.event.sequence
                if update.event.WhichOneof("kind") == "stored":
                    stored.update(update.event.stored.block_hashes)
    updates.cancel()
    assert saw_load

    again = stub.WatchState(pb.WatchStateRequest())
    snapshot = (await again.read()).snapshot
    again.cancel()
    assert expected <= set(snapshot.block_hashes)


async def test_health_reports_serving_and_info_describes_the_worker(engine, channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", WORKER_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = await stub.GetInfo(pb.InfoRequest())
    assert (info.worker_id, info.model, info.pool) == ("grpc-test-worker", "electron", "test")
    assert (info.block_size, info.vocab_size) == (engine.block_size, engine.vocab_size)
    assert info.max_model_len == MAX_MODEL_LEN


async def test_stopping_the_server_ends_state_streams_at_once(engine):
    server, port = await serve_worker(engine, "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        updates = pb_grpc.WorkerStub(ch).WatchState(pb.WatchStateRequest())
        assert (await updates.read()).WhichOneof("update") == "snapshot"
        started = time.monotonic()
        await server.stop(10)
        # A WatchState stream never ends by itself: the stop must end it, not wait it out.
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())


async def test_a_second_server_cannot_bind_a_taken_port(engine, address):
    port = int(address.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="cannot listen"):
        await serve_worker(engine, "127.0.0.1", port)


# -- Session: one router's requests on one stream -------------------------------------------------

async def session_results(call, request_ids, messages=None) -> dict[str, dict]:
    """Reads a Session until every id in ``request_ids`` ended: per id, its deltas' texts,
    its finish reasons and its end."""
    results = {rid: {"text": "", "finish": [], "end": None} for rid in request_ids}
    while any(r["end"] is None for r in results.values()):
        message = await asyncio.wait_for(call.read(), 30)
        assert message is not grpc.aio.EOF, "the session ended early"
        if messages is not None:
            messages.append(message)
        for delta in message.deltas:
            if delta.request_id not in results:
                continue  # a request given up, whose last deltas were already on their way
            results[delta.request_id]["text"] += delta.response.text
            if delta.response.finish_reason:
                results[delta.request_id]["finish"].append(delta.response.finish_reason)
        for end in message.ends:
            if end.request_id in results:
                assert results[end.request_id]["end"] is None, "a request ended twice"
                results[end.request_id]["end"] = end
    return results


async def test_session_serves_many_requests_and_sends_what_is_ready_together(engine, stub):
    """Eight requests in one message: each gets the same text a Generate call gets, its
    deltas come before its end, and the engine's steps (all eight in each) leave in far
    fewer messages than deltas."""
    ids = prompt(engine, 12)
    expected = "".join(m.text for m in [m async for m in stub.Generate(request(ids))])
    requests = [request(ids) for _ in range(8)]
    call = stub.Session()
    await call.write(pb.SessionRequest(generate=requests))
    messages: list[pb.SessionResponse] = []
    results = await session_results(call, [r.request_id for r in requests], messages)
    for r in results.values():
        assert r["text"] == expected and r["finish"] == ["length"] and r["end"].status == 0
    deltas = sum(len(m.deltas) for m in messages)
    assert deltas >= 8 * 4 and len(messages) <= deltas / 2
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # half-closed with nothing running: it ends
    assert await call.code() == grpc.StatusCode.OK


async def test_session_cancel_aborts_one_request_and_the_others_go_on(engine, stub):
    baseline = engine.load()
    long, short = (request(prompt(engine, 40), max_tokens=MAX_MODEL_LEN - 41),
                   request(prompt(engine, 10), max_tokens=8))
    call = stub.Session()
    await call.write(pb.SessionRequest(generate=[long]))
    message = await call.read()
    assert message.deltas[0].request_id == long.request_id
    assert engine.load().running == 1
    await call.write(pb.SessionRequest(generate=[short], cancel=[long.request_id]))
    results = await session_results(call, [short.request_id])
    assert results[short.request_id]["finish"] == ["length"]
    await until(lambda: engine.load().running == 0
                and engine.load().kv_blocks_used == baseline.kv_blocks_used)
    call.cancel()


async def test_session_request_errors_end_that_request_only(engine, stub):
    """A request the worker refuses ends with the status and error a Generate call would
    have ended with; the request beside it is served."""
    good = request(prompt(engine, 10))
    bad = request(prompt(engine, 10))
    bad.model = "other-model"
    call = stub.Session()
    await call.write(pb.SessionRequest(generate=[bad, good]))
    results = await session_results(call, [bad.request_id, good.request_id])
    end = results[bad.request_id]["end"]
    assert end.status != 0 and results[bad.request_id]["text"] == ""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [m async for m in stub.Generate(bad)]
    assert end.status == refused.value.code().value[0]
    assert json.loads(end.error) == electron_error(refused.value)
    assert results[good.request_id]["end"].status == 0
    assert results[good.request_id]["finish"] == ["length"]
    call.cancel()


async def test_closing_a_session_aborts_every_request_on_it(engine, stub):
    baseline = engine.load()
    requests = [request(prompt(engine, 30), max_tokens=MAX_MODEL_LEN - 31) for _ in range(3)]
    call = stub.Session()
    await call.write(pb.SessionRequest(generate=requests))
    await call.read()
    await until(lambda: engine.load().running == 3)
    call.cancel()  # the router closed its channel, or vanished
    await until(lambda: engine.load().running == 0
                and engine.load().kv_blocks_used == baseline.kv_blocks_used)


async def test_session_refuses_a_second_request_under_a_live_id(engine, stub):
    req = request(prompt(engine, 10), max_tokens=MAX_MODEL_LEN - 11)
    call = stub.Session()
    await call.write(pb.SessionRequest(generate=[req]))
    await call.read()
    await call.write(pb.SessionRequest(generate=[req]))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await until(lambda: engine.load().running == 0)


async def test_a_session_whose_router_stops_reading_ends_and_aborts_its_requests(
        engine, address, monkeypatch):
    """A router that stops reading (its flow-control window full: no BDP probing keeps it at
    64 KB) cannot grow the worker's outbox past MAX_OUTBOX_ITEMS: the Session ends with
    UNAVAILABLE after what was sent and every request on it is aborted."""
    monkeypatch.setattr(grpc_service, "MAX_OUTBOX_ITEMS", 256)
    baseline = engine.load()
    # Each delta carries 20 top logprobs (~300 bytes): the window fills within ~200 deltas.
    requests = [request(prompt(engine, 30), max_tokens=MAX_MODEL_LEN - 31, logprobs=True,
                        top_logprobs=20) for _ in range(3)]
    async with grpc.aio.insecure_channel(address,
                                         options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = pb_grpc.WorkerStub(channel).Session()
        await call.write(pb.SessionRequest(generate=requests))
        await until(lambda: engine.load().running == 3)
        # Left alone they would run ~2,000 steps each; unread, they are aborted at once.
        await until(lambda: engine.load().running == 0
                    and engine.load().kv_blocks_used == baseline.kv_blocks_used, 5.0)
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (message := await call.read()) is not grpc.aio.EOF:
                received += len(message.deltas)
                assert not message.ends  # no request finished
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert received < 3 * (MAX_MODEL_LEN - 31)



async def test_an_idle_connection_that_pings_every_second_is_not_sent_away(address):
    """Routers ping their workers also while no call runs (router/fleet/client.py's
    CHANNEL_OPTIONS); the worker accepts pings as often as every second (SERVER_OPTIONS). A
    ping policy the server does not apply (a misspelt option name is silently ignored, and
    gRPC's default is one ping in 5 minutes) answers them with GOAWAY "too_many_pings" after
    two strikes, and the connection drops."""
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 2000),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        await health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE))
        await asyncio.sleep(5)  # about five pings, and no call
        assert ch.get_state() == grpc.ChannelConnectivity.READY
