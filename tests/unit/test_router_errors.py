"""The error body and status table of docs/api.md ("Errors"), X-Request-Id, the body limit and auth, driven
through the real router app (no worker: requests that pass every check end in 503)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
import redis
from fastapi import Request
from fastapi.exceptions import RequestValidationError

from core.config import load_config
from core.endpoints import StaticWorkerSource
from core.errors import ElectronError, InternalError, InvalidRequest, WorkerUnavailable
from core.model_files import resolve_model_path
from core.protocol import error_from_rpc
from core.tokenizer import Tokenizer
from router.api.app import create_app
from router.openai.errors import GENERIC_500, body_of, error_response
from router.tenancy.sqldb import DatabaseUnavailable
from tests.support.openai_schema import validate
from tests.support.serving import serve_router, stop_router
from tests.support.tenancy import local_tenancy

KEY = "sk-test-key"
BODY = {"model": "electron", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


def make_app(tokenizer: Tokenizer, **overrides: Any):
    overrides = {"auth": {"enabled": False}, "tenancy": local_tenancy(), **overrides}
    return create_app(load_config(env={}, overrides=overrides), StaticWorkerSource([]),
                      tokenizer=tokenizer)


@pytest.fixture(scope="module")
def app(tokenizer):
    return make_app(tokenizer, router={"max_body_bytes": 4096})


@pytest.fixture(scope="module")
def auth_app(tokenizer):
    return make_app(tokenizer, auth={"enabled": True, "static_keys": [KEY, "sk-other"]})


@asynccontextmanager
async def client(app, raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            yield c


def error_of(response: httpx.Response, status: int, type_: str, code: str | None,
             param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    validate(body, "ErrorResponse")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    return error


# -- 400: malformed JSON is never a 422 --------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{\"model\": \"electron\",", b"not json", b"", b"\xff\xfe"])
async def test_malformed_json_is_400_invalid_request(app, raw):
    async with client(app) as c:
        response = await c.post("/v1/chat/completions", content=raw,
                                headers={"content-type": "application/json"})
    error = error_of(response, 400, "invalid_request_error", None)
    assert "could not parse the JSON body" in error["message"]


async def test_fastapi_validation_errors_are_400_naming_the_field(tokenizer):
    app = make_app(tokenizer)

    async def typed(count: int) -> dict[str, int]:
        return {"count": count}

    app.add_api_route("/typed", typed, methods=["GET"])
    async with client(app) as c:
        response = await c.get("/typed", params={"count": "many"})
    error = error_of(response, 400, "invalid_request_error", None, param="count")
    assert "valid integer" in error["message"]


# -- 404 / 405 -----------------------------------------------------------------------------------

async def test_unknown_model_is_404_model_not_found(app):
    async with client(app) as c:
        chat = await c.post("/v1/chat/completions", json={**BODY, "model": "gpt-4o"})
        model = await c.get("/waves/v1/models/gpt-4o")
    error_of(chat, 404, "invalid_request_error", "model_not_found", param="model")
    error_of(model, 404, "invalid_request_error", "model_not_found", param="model")


async def test_unknown_route_and_wrong_method_use_the_error_body(app):
    async with client(app) as c:
        missing = await c.post("/v1/completions", json=BODY)
        wrong = await c.get("/v1/chat/completions")
    assert "Invalid URL (POST /v1/completions)" in error_of(
        missing, 404, "invalid_request_error", None)["message"]
    error_of(wrong, 405, "invalid_request_error", None)
    assert "POST" in wrong.headers["allow"]


# -- 413 -----------------------------------------------------------------------------------------

async def test_body_over_the_limit_by_content_length_is_413(app):
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with client(app) as c:
        response = await c.post("/v1/chat/completions", json=big)
    error = error_of(response, 413, "invalid_request_error", "payload_too_large")
    assert "4096 bytes" in error["message"]


async def test_body_over_the_limit_without_content_length_is_413(app):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "electron", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    async with client(app) as c:
        response = await c.post("/v1/chat/completions", content=chunks())
    assert "content-length" not in response.request.headers
    error_of(response, 413, "invalid_request_error", "payload_too_large")


async def test_body_just_under_the_limit_is_served(app):
    body = {**BODY, "messages": [{"role": "user", "content": "z" * 3900}]}
    async with client(app) as c:
        response = await c.post("/v1/chat/completions", json=body)
    error_of(response, 503, "server_error", "no_workers")


# -- 401 -----------------------------------------------------------------------------------------

async def test_missing_key_with_auth_on_is_401(auth_app):
    async with client(auth_app) as c:
        response = await c.post("/v1/chat/completions", json=BODY)
    error = error_of(response, 401, "authentication_error", "invalid_api_key")
    assert "didn't provide an API key" in error["message"]


@pytest.mark.parametrize("header", [f"Bearer {KEY}x", "Bearer ", f"Basic {KEY}", KEY])
async def test_unknown_or_malformed_key_is_401(auth_app, header):
    async with client(auth_app) as c:
        response = await c.get("/v1/models", headers={"Authorization": header})
    error = error_of(response, 401, "authentication_error", "invalid_api_key")
    assert KEY not in error["message"]


async def test_known_key_passes_and_health_needs_none(auth_app):
    async with client(auth_app) as c:
        served = await c.post("/waves/v1/chat/completions", json=BODY,
                              headers={"Authorization": f"Bearer {KEY}"})
        models = await c.get("/v1/models", headers={"Authorization": "Bearer sk-other"})
        health = await c.get("/health")
        ready = await c.get("/ready")
        ready_workers = await c.get("/ready?workers=1")
    error_of(served, 503, "server_error", "no_workers")
    assert models.status_code == 200
    validate(models.json(), "ListModelsResponse")
    assert [m["id"] for m in models.json()["data"]] == ["electron"]
    assert health.status_code == 200
    # Ready for the Service with no worker (the API answers 503 itself); ?workers=1 is not.
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "workers": 0}
    error_of(ready_workers, 503, "server_error", "no_workers")
    assert int(ready_workers.headers["retry-after"]) >= 1


# -- 503 / 500 -------------------------------------------------------------------------------------

async def test_no_workers_is_503_with_retry_after(app):
    async with client(app) as c:
        response = await c.post("/v1/chat/completions", json=BODY)
    error_of(response, 503, "server_error", "no_workers")
    assert int(response.headers["retry-after"]) >= 1


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


def test_every_503_kind_carries_retry_after():
    """Walks every error class the router may answer 503 with (worker failures, shedding,
    no workers, the drain, the database, the limit store), and one a later change may add:
    each response has Retry-After, from the one place that builds it."""
    import router.api.drain  # noqa: F401 - its ShuttingDown is one of them
    import router.tenancy.limits  # noqa: F401 - LimitStoreUnavailable
    kinds = [c for c in _subclasses(ElectronError) if c.status == 503]
    assert {c.__name__ for c in kinds} >= {"Overloaded", "NoWorkers", "WorkerUnavailable",
                                           "ShuttingDown", "DatabaseUnavailable",
                                           "LimitStoreUnavailable"}

    class Unforeseen(ElectronError):
        status = 503

    for kind in [*kinds, Unforeseen]:
        response = error_response(kind("gone"))
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1, kind


@pytest.mark.parametrize("error", [
    redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.5:6379."),
    redis.exceptions.TimeoutError("Timeout reading from 10.0.0.5:6379"),
    redis.exceptions.ResponseError("MOVED 1234 10.0.0.6:6379"),  # an error reply
])
async def test_a_redis_error_on_any_route_is_a_503_never_a_500(tokenizer, error):
    app = make_app(tokenizer)

    async def uses_redis(request: Request) -> None:
        raise error

    app.add_api_route("/v1/uses-redis", uses_redis, methods=["GET"])
    async with client(app, raise_app_exceptions=False) as c:
        response = await c.get("/v1/uses-redis")
    error_of(response, 503, "server_error", "overloaded")
    assert int(response.headers["retry-after"]) >= 1
    assert "10.0.0" not in response.text and "Traceback" not in response.text


async def test_unexpected_exception_is_generic_500_without_traceback(tokenizer):
    app = make_app(tokenizer)

    async def broken(request: Request) -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/v1/broken", broken, methods=["GET"])
    async with client(app, raise_app_exceptions=False) as c:
        response = await c.get("/v1/broken", headers={"X-Request-Id": "trace-me-500"})
    error = error_of(response, 500, "server_error", None)
    assert error["message"] == GENERIC_500
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.headers["x-request-id"] == "trace-me-500"


async def test_a_500_tells_a_keep_alive_client_to_close_and_the_next_request_is_served(
        tokenizer):
    # Starlette re-raises after the 500 is sent and uvicorn then drops the connection: without
    # "Connection: close" a client reuses it and its next request is reset (issue 13).
    app = make_app(tokenizer)

    async def broken(request: Request) -> None:
        raise RuntimeError("boom")

    app.add_api_route("/v1/broken", broken, methods=["GET"])
    router = await serve_router(app)
    try:
        async with httpx.AsyncClient(base_url=router.base) as c:
            for _ in range(3):
                response = await c.get("/v1/broken")
                assert response.status_code == 500
                assert response.headers["connection"] == "close"
                assert (await c.get("/health")).status_code == 200
    finally:
        await stop_router(router)


# -- X-Request-Id -----------------------------------------------------------------------------------

async def test_request_id_is_echoed_on_success_and_on_errors(app):
    async with client(app) as c:
        ok = await c.get("/health", headers={"X-Request-Id": "client-id-1"})
        bad = await c.post("/v1/chat/completions", content=b"{",
                           headers={"X-Request-Id": "client-id-2"})
        big = await c.post("/v1/chat/completions", content=b"x" * 5000,
                           headers={"X-Request-Id": "client-id-3"})
    assert ok.headers["x-request-id"] == "client-id-1"
    assert bad.headers["x-request-id"] == "client-id-2"
    assert big.status_code == 413 and big.headers["x-request-id"] == "client-id-3"


async def test_request_id_is_made_when_absent_or_unusable(app):
    async with client(app) as c:
        first = await c.get("/health")
        second = await c.get("/v1/models/nope")
        unusable = await c.get("/health", headers={"X-Request-Id": "x" * 500})
    ids = [r.headers["x-request-id"] for r in (first, second, unusable)]
    assert all(i.startswith("req_") for i in ids)
    assert len(set(ids)) == 3


def test_validation_error_handler_is_registered_for_fastapi_errors(app):
    # Without it FastAPI would answer 422 for a RequestValidationError.
    assert RequestValidationError in app.exception_handlers


async def test_a_large_body_is_validated_within_its_time_budget(tokenizer):
    """Bodies past 16 KiB are validated on a thread under router.validation_timeout_s: one
    that cannot finish in time is a 400, and the event loop never waited for it."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "description":
                                                          "x" * 40} for i in range(400)}}
    body = {**BODY, "response_format": {"type": "json_schema", "json_schema": {
        "name": "big", "schema": schema}}}
    slow = make_app(tokenizer, router={"validation_timeout_s": 1e-6})
    async with client(slow) as c:
        response = await c.post("/v1/chat/completions", json=body)
    error_of(response, 400, "invalid_request_error", None)
    assert "took more than" in response.json()["error"]["message"]
    async with client(make_app(tokenizer)) as c:  # in time: valid, then no worker (503)
        error_of(await c.post("/v1/chat/completions", json=body), 503, "server_error",
                 "no_workers")


# -- what error bodies tell ----------------------------------------------------------------------

WORKER_ID, PEER = "worker-7f3a", "10.42.3.17:40521"
# What the router's errors carry for its log: the worker, its address, what gRPC said.
LEAKY_RPC = grpc.aio.AioRpcError(
    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
    details=f"failed to connect to all addresses; last error: ipv4:{PEER}: Connection refused")


def _leaky_errors() -> list[tuple[ElectronError, int, str | None]]:
    return [
        (error_from_rpc(LEAKY_RPC, WORKER_ID), 503, "worker_unavailable"),
        (error_from_rpc(grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
            details=f"Received message larger than max from ipv4:{PEER}"), WORKER_ID),
         503, "overloaded"),
        (WorkerUnavailable(f"worker {WORKER_ID} sent nothing within 30 s"), 503,
         "worker_unavailable"),
        (InternalError(f"worker {WORKER_ID} sent a KV event of unknown kind at {PEER}"), 500,
         None),
        (DatabaseUnavailable(f'connection to server at "{PEER}", port 5432 failed'), 503,
         "overloaded"),
    ]


@pytest.mark.parametrize("index", range(5))
async def test_error_bodies_name_no_worker_address_or_peer_detail(tokenizer, index):
    exc, status, code = _leaky_errors()[index]
    app = make_app(tokenizer)

    async def failing(request: Request) -> None:
        raise exc

    app.add_api_route("/v1/failing", failing, methods=["GET"])
    async with client(app) as c:
        response = await c.get("/v1/failing")
    error = error_of(response, status, "server_error", code)
    for leak in (WORKER_ID, PEER, "10.42.3.17", "ipv4", "UNAVAILABLE", "port 5432"):
        assert leak not in response.text
    assert error["message"] == exc.public_message


def test_a_stream_error_event_is_built_from_the_public_message():
    exc = error_from_rpc(LEAKY_RPC, WORKER_ID)
    body = body_of(exc)
    assert body["error"]["code"] == "worker_unavailable"
    assert WORKER_ID not in str(body) and PEER not in str(body)
    # A request's own error keeps its message: it tells the client what to fix.
    invalid = InvalidRequest("'max_tokens' must be at least 1", param="max_tokens")
    assert body_of(invalid)["error"]["message"] == invalid.message
