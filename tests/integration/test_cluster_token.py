"""The cluster token on a real worker gRPC server (a tiny random-weight Llama behind it):
every RPC (the Session stream and the health service's included), is refused UNAUTHENTICATED without the token or with
a wrong one, and served with the right one; the router's WorkerClient sends it."""

from __future__ import annotations

import itertools

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.cluster_token import TOKEN_METADATA_KEY, new_cluster_token
from core.config import EngineConfig
from core.endpoints import WorkerEndpoint
from core.errors import WorkerUnavailable
from core.pb.electron.v1 import worker_pb2 as pb
from core.pb.electron.v1 import worker_pb2_grpc as pb_grpc
from core.protocol import WORKER_SERVICE
from router.fleet.client import WorkerClient
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.async_engine import AsyncEngine
from workers.grpc_service import serve_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = new_cluster_token()
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))
    eng = AsyncEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                   kv_cache_bytes=4 * 2**20, max_model_len=256,
                                   torch_threads=1), worker_id="token-test-worker")
    yield eng
    eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def address(engine):
    server, port = await serve_worker(engine, "127.0.0.1", 0, model_id="electron",
                                      token=TOKEN)
    yield f"127.0.0.1:{port}"
    await server.stop(None)


def _generate_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=f"tok-{next(_ids)}", token_ids=[5, 6, 7, 8],
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))


async def _call_every_rpc(channel: grpc.aio.Channel, metadata) -> list[object]:
    """Calls each RPC of the worker's port once; returns what each answered."""
    stub = pb_grpc.WorkerStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    answers: list[object] = []
    for service in ("", WORKER_SERVICE):
        answers.append(await health.Check(health_pb2.HealthCheckRequest(service=service),
                                          metadata=metadata))
    answers.append(await stub.GetInfo(pb.InfoRequest(), metadata=metadata))
    answers.append(await stub.Abort(pb.AbortRequest(request_id="nobody"), metadata=metadata))
    answers.append([m async for m in stub.Generate(_generate_request(), metadata=metadata)])
    watch = stub.WatchState(pb.WatchStateRequest(), metadata=metadata)
    try:
        answers.append(await watch.read())
    finally:
        watch.cancel()
    session = stub.Session(metadata=metadata)
    request = _generate_request()
    await session.write(pb.SessionRequest(generate=[request]))
    ends: list[pb.SessionEnd] = []
    while not ends:
        ends = [e for e in (await session.read()).ends if e.request_id == request.request_id]
    await session.done_writing()
    answers.append(ends[0])
    return answers


@pytest.mark.parametrize("metadata", [
    None,
    ((TOKEN_METADATA_KEY, TOKEN[:-1] + ("A" if TOKEN[-1] != "A" else "B")),),
    ((TOKEN_METADATA_KEY, ""),),
    ((TOKEN_METADATA_KEY, TOKEN + "x"),),
    (("authorization", f"Bearer {TOKEN}"),),  # the token under another name is no token
], ids=["none", "wrong", "empty", "longer", "other-key"])
async def test_every_rpc_is_refused_without_the_right_token(address, metadata):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        calls = [
            lambda: health.Check(health_pb2.HealthCheckRequest(service=""), metadata=metadata),
            lambda: health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE),
                                 metadata=metadata),
            lambda: stub.GetInfo(pb.InfoRequest(), metadata=metadata),
            lambda: stub.Abort(pb.AbortRequest(request_id="someone"), metadata=metadata),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        session = stub.Session(metadata=metadata)
        await session.write(pb.SessionRequest(generate=[_generate_request()]))
        for streaming in (stub.Generate(_generate_request(), metadata=metadata),
                          stub.WatchState(pb.WatchStateRequest(), metadata=metadata),
                          session):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await streaming.read()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The refusal says what is missing, never the token it expected.
            assert TOKEN not in (info.value.details() or "")


async def test_every_rpc_is_served_with_the_token(address):
    async with grpc.aio.insecure_channel(address) as channel:
        answers = await _call_every_rpc(channel, ((TOKEN_METADATA_KEY, TOKEN),))
    serving = health_pb2.HealthCheckResponse.SERVING
    assert [a.status for a in answers[:2]] == [serving, serving]
    assert answers[2].worker_id == "token-test-worker"
    assert answers[3].found is False
    assert answers[4][-1].usage.completion_tokens == 2
    assert answers[5].WhichOneof("update") == "snapshot"
    assert answers[6].status == 0  # the Session request finished (OK)


async def test_the_router_client_sends_the_token(address):
    endpoint = WorkerEndpoint("token-test-worker", address, "electron", "default")
    client = WorkerClient(endpoint, token=TOKEN)
    try:
        info = await client.connect()
        assert info.worker_id == "token-test-worker"
        stream = await client.generate(_generate_request())
        messages = [m async for m in stream]
        assert messages[-1].usage.completion_tokens == 2
        assert not client.broken  # its WatchState stream was accepted too
    finally:
        await client.close()


@pytest.mark.parametrize("token", [None, new_cluster_token()], ids=["none", "another"])
async def test_a_router_without_the_token_cannot_connect(address, token):
    endpoint = WorkerEndpoint("token-test-worker", address, "electron", "default")
    client = WorkerClient(endpoint, token=token)
    try:
        with pytest.raises(WorkerUnavailable, match="UNAUTHENTICATED"):
            await client.connect()
    finally:
        await client.close()
