"""The router's FastAPI app: routes, auth and the app's lifespan (docs/api.md).

Handlers are thin: authenticate, validate, call one service function, return. Both base URLs
(``/v1`` and ``/waves/v1``) serve the same routes. ``/health`` (liveness) and ``/ready`` (started:
the tenancy store is open; ``/ready?workers=N``: at least N workers connected) need no key. A
stopping router drains (router/api/drain.py): ``/ready`` is 503 from its first moment."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.routing import Route

from core.config import Config, RouterConfig
from core.endpoints import WorkerSource
from core.errors import InvalidRequest, ModelNotFound, NoWorkers, RateLimited
from core.grammar import check_grammar
from core.heap import settle_heap
from core.model_files import resolve_model_path
from core.pb.electron.v1 import worker_pb2 as pb
from core.telemetry import DISABLED, Tracing
from core.tokenizer import Tokenizer
from router.api import tenancy as tenancy_routes
from router.api.drain import Drain
from router.api.lifecycle import ChatRequest
from router.api.middleware import RequestContextMiddleware
from router.chat.response import system_fingerprint
from router.chat.service import ChatService
from router.fleet.breaker import CircuitBreaker
from router.fleet.pool import WorkerPool
from router.openai.errors import error_response, install_error_handlers
from router.openai.schemas import (
    ChatCompletionRequest,
    admission_fields,
    decode_json,
    parse_chat_request,
)
from router.routing.factory import make_policy
from router.routing.prefix_index import PrefixIndex
from router.telemetry import observe
from router.telemetry.metrics import RouterMetrics, record_rate_limit_rejection
from router.tenancy.admission import Admission, Tenancy
from router.tenancy.limits import LimitStoreUnavailable
from router.tools.grammar_spec import grammar_spec, tool_use

BASE_PATHS = ("/v1", "/waves/v1")
OWNED_BY = "electron"
READY_RETRY_AFTER_S = 1.0
# Bodies larger than this are validated on a thread (their schemas may take milliseconds).
OFFLOAD_VALIDATION_BYTES = 16 * 1024


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


# -- auth -------------------------------------------------------------------------------------------

# async: a plain def dependency would hop to a thread pool on every request.
async def authenticate(request: Request) -> None:
    """The request's ``Principal`` on ``request.state.principal`` (None while auth is off)."""
    with observe.span("auth"):
        request.state.principal = await request.app.state.tenancy.authenticate(
            request.headers.get("authorization"))


# -- routes -----------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    """Auth, cheap checks, then the limits, then the rest: a tenant over its limits (or a
    body built to be expensive to validate) costs the router a JSON decode and two fields.

    A plain Starlette route, not a FastAPI one: it is the hot path, and FastAPI's
    dependency solving and response handling cost more CPU than the rest of the route
    together (docs/operations-notes.md#fastapi-the-hot-route-is-a-plain-starlette-route).
    Errors raised here reach the same exception handlers."""
    state = request.app.state
    drain: Drain = state.drain
    if drain.draining:  # before anything is admitted: no slot, no ledger row
        raise drain.refusal()
    with observe.span("auth"):
        # The revocation check comes with the limits' round trip.
        request.state.principal = await state.tenancy.authenticate(
            request.headers.get("authorization"), check_revoked=False)
    settings = state.config.router
    raw = await request.body()  # at most router.max_body_bytes
    body = decode_json(raw)
    asked, sequences = admission_fields(body)
    observe.set_model(asked, settings.model_id)
    chat: ChatService = state.chat
    # Before anything is admitted or billed: an unknown model is a 404 and writes no row;
    # the ledger stores the served id, never the client's text.
    model = chat.served_model(asked)
    request_id = request.state.request_id
    with observe.span("limits"):
        try:
            admission: Admission = await state.tenancy.admit(
                request.state.principal, model, request.state.server_request_id,
                request.state.client_request_id, sequences=sequences)
        except RateLimited as exc:
            record_rate_limit_rejection(
                request, "concurrency" if exc.code == "concurrency_limit_exceeded" else "requests")
            raise
    try:
        req = await _validated(body, len(raw), settings)
    except BaseException:
        admission.finish("error", 0, 0, 0)  # billed nothing, counted as a request
        raise
    try:
        return await ChatRequest(chat, admission, req, request_id, drain,
                                 write_timeout_s=settings.client_write_timeout_s
                                 ).respond(request.receive, _json)
    except RateLimited:  # its token budget does not fit the plan's tokens per minute
        record_rate_limit_rejection(request, "tokens")
        raise


async def _validated(body: Any, size: int, settings: RouterConfig) -> ChatCompletionRequest:
    """The whole request validated, within a time budget: its fields on the event loop when
    the body is small, else on a thread (its JSON schemas are checked against the
    metaschema); then the grammar of its tools or response format, which must compile in the
    worker's own grammar code (``core/grammar.py``: what the router accepts is what the
    worker enforces), always on a thread. One large request never stalls the other streams."""
    max_messages = settings.max_messages
    try:
        async with asyncio.timeout(settings.validation_timeout_s):
            if size > OFFLOAD_VALIDATION_BYTES:
                return await asyncio.to_thread(_validate, body, max_messages)
            req, spec = _parse(body, max_messages)
            if spec is not None:
                await asyncio.to_thread(check_grammar, spec)
            return req
    except TimeoutError:
        raise InvalidRequest(f"validating this request took more than "
                             f"{settings.validation_timeout_s:g} s; send smaller schemas or "
                             "fewer tools") from None


def _parse(body: Any, max_messages: int) -> tuple[ChatCompletionRequest, pb.GrammarSpec | None]:
    """The request's fields validated, and the grammar spec its output must follow."""
    req = parse_chat_request(body, max_messages=max_messages)
    return req, grammar_spec(req, tool_use(req))


def _validate(body: Any, max_messages: int) -> ChatCompletionRequest:
    req, spec = _parse(body, max_messages)
    if spec is not None:
        check_grammar(spec)
    return req


async def list_models(request: Request) -> Response:
    return _json({"object": "list", "data": [request.app.state.model_card]})


async def get_model(model_id: str, request: Request) -> Response:
    card = request.app.state.model_card
    if model_id != card["id"]:
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access "
                            "to it.", param="model")
    return _json(card)


async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


async def health() -> Response:
    return _json({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness for a load balancer: the app has started (its lifespan opened the tenancy
    store), whether or not a worker is connected yet. With no worker the API itself answers
    503 ``no_workers`` with ``Retry-After``, which clients retry; taking every replica out of
    a Service instead would turn that into connection errors. ``?workers=N`` asks for at
    least N connected workers (503 ``no_workers`` until then): what scripts and tests wait
    on. A stopping router (draining) is not ready: 503 ``shutting_down``."""
    drain: Drain = request.app.state.drain
    if drain.draining:
        return error_response(drain.refusal())
    pool: WorkerPool = request.app.state.pool
    workers = len(pool.workers())
    try:
        wanted = int(request.query_params.get("workers", "0"))
    except ValueError:
        wanted = 1
    if wanted > 0 and (not pool.ready or workers < wanted):
        return error_response(NoWorkers(f"{workers} of {wanted} worker(s) connected",
                                        retry_after=READY_RETRY_AFTER_S))
    return _json({"status": "ready", "workers": workers})


# -- the app ----------------------------------------------------------------------------------------

def create_app(config: Config, worker_source: WorkerSource,
               tokenizer: Tokenizer | None = None, tracing: Tracing = DISABLED) -> FastAPI:
    """The router app. ``worker_source`` is a ``core.endpoints.WorkerSource``;
    ``tokenizer`` (a ``core.tokenizer.Tokenizer``) defaults to the one of
    ``config.engine.model``, the model the workers run; ``tracing`` is the process's
    (``core.telemetry.tracing_from_env``). The lifespan starts and stops the worker
    pool."""
    if tokenizer is None:
        tokenizer = Tokenizer.from_model_path(resolve_model_path(config.engine.model))
    settings = config.router
    index = PrefixIndex()  # this replica's own view, fed by every worker's state stream
    pool = WorkerPool(worker_source, model_id=settings.model_id, poll_s=settings.registry_poll_s,
                      policy=make_policy(settings, index), index=index,
                      breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_open_s),
                      tracing=tracing, shared_pool=config.cluster.pool,
                      fallback_pools=[p.name for p in config.autoscaler.pools
                                      if p.fallback_to_shared],
                      token=config.cluster.token)
    chat = ChatService(pool=pool, tokenizer=tokenizer, settings=settings,
                       fingerprint=system_fingerprint(config.engine.model))

    tenancy = Tenancy(config, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.metrics_port is not None:
            app.state.metrics_port = app.state.metrics.serve(settings.host,
                                                             settings.metrics_port)
        lag = asyncio.create_task(app.state.metrics.watch_loop_lag(), name="loop-lag")
        try:
            await tenancy.start()
            try:
                await pool.start()
                try:
                    settle_heap()
                    yield
                finally:
                    await pool.stop()  # ends open streams: their admissions finish
            finally:
                await tenancy.stop()
        finally:
            lag.cancel()
            app.state.metrics.stop()

    # FastAPI's own OpenTelemetry bridge is off: the router opens its HTTP spans itself
    # (router/telemetry/observe.py), and the bridge's per-request checks cost CPU.
    app = FastAPI(title="Electron Serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, telemetry={"tracing": False, "metrics": False,
                                               "logs": False})
    app.state.config = config
    app.state.pool = pool
    app.state.chat = chat
    app.state.drain = Drain()
    app.state.metrics = RouterMetrics()
    app.state.tenancy = tenancy
    tenancy.ledger.on_quarantine = app.state.metrics.ledger_quarantined.inc
    app.state.model_card = {"id": settings.model_id, "object": "model",
                            "created": int(time.time()), "owned_by": OWNED_BY}
    install_error_handlers(app, translate={RedisError: LimitStoreUnavailable.of})
    # Added first, so it runs inside RequestContextMiddleware, whose request id it reads.
    app.add_middleware(observe.ObservabilityMiddleware, metrics=app.state.metrics,
                       tracing=tracing)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)

    api = APIRouter(dependencies=[Depends(authenticate)])
    api.add_api_route("/models", list_models, methods=["GET"])
    api.add_api_route("/models/{model_id:path}", get_model, methods=["GET"])
    api.add_api_route("/usage", tenancy_routes.usage, methods=["GET"])
    for base in BASE_PATHS:
        app.router.routes.append(Route(f"{base}/chat/completions", chat_completions,
                                       methods=["POST"]))
        app.include_router(api, prefix=base)
    app.include_router(tenancy_routes.admin_routes(), prefix="/v1/admin")
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    if settings.metrics_port is None:  # else on its own port (the lifespan starts it)
        app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
