"""The worker's gRPC service: Generate, Session, Abort, WatchState, GetInfo, and
grpc.health.v1.

Every call to it must carry the cluster token (``core.cluster_token``): without it, or with
another, it ends UNAUTHENTICATED before any handler runs.

Errors cross this boundary in one place, ``ErrorInterceptor``: an ``ElectronError`` becomes a
gRPC status plus trailing metadata (``core.protocol``'s codec) from which the router rebuilds
the same error; anything else becomes INTERNAL with a generic message (the traceback is
logged here and never sent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry.trace import StatusCode

from core.cluster_token import TokenServerInterceptor
from core.errors import ElectronError, InvalidRequest, ModelNotFound
from core.logs import request_id_var
from core.pb.electron.v1 import worker_pb2 as pb
from core.pb.electron.v1 import worker_pb2_grpc as pb_grpc
from core.protocol import WORKER_SERVICE, error_metadata, session_end, status_code_for
from core.telemetry import DISABLED, Tracing
from workers import wire
from workers.engine.kv_events import SubscriberFellBehind
from workers.engine.outputs import Progress
from workers.latency import RecentLatencies
from workers.observe import GenerationObserver

if TYPE_CHECKING:
    from workers.engine.async_engine import AsyncEngine
    from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# WatchState sends the worker's load this often (and whenever it sends nothing else).
LOAD_INTERVAL_S = 0.1
# Most deltas in one Session message (each is a token or a few, with its logprobs if asked).
MAX_SESSION_DELTAS = 512
# Most deltas and ends a Session may hold unsent (a router that stops reading its Session:
# gRPC flow control holds our writes): past it the Session ends with UNAVAILABLE and every
# request on it is aborted, so a router that does not read cannot grow this worker's memory
# without bound. A delta is ~100 bytes, ~1 KB with 20 top logprobs: at most tens of MB.
# A router that reads keeps it near one engine step's deltas (one per running sequence).
MAX_OUTBOX_ITEMS = 65_536

# Largest message a worker takes: above the router's MAX_REQUEST_BYTES, one request.
MAX_RECEIVE_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind silently.
    ("grpc.so_reuseport", 0),
    # Ping idle connections so a router that vanished without a FIN (node lost) releases its
    # WatchState streams and in-flight generations within ~30 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients (routers) may send keepalive pings as often as every second; a client pinging
    # more often is answered with GOAWAY ("too_many_pings") after two strikes. (The C name is
    # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; a misspelt option is ignored
    # without a word, and gRPC's default allows one ping in 5 minutes.)
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A router's Session message batches requests (router/fleet/client.py's limits).
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
)


# -- errors -------------------------------------------------------------------------------------

_INTERNAL_MESSAGE = "the worker failed to serve the request"


async def _abort_with(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """Ends the RPC with the status that ``exc`` maps to; always raises AbortError."""
    if isinstance(exc, ElectronError):
        await context.abort(status_code_for(exc), exc.message,
                            trailing_metadata=error_metadata(exc))
    log.exception("unexpected error in %s", method, exc_info=exc)
    generic = ElectronError(_INTERNAL_MESSAGE)
    await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE,
                        trailing_metadata=error_metadata(generic))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping any handler to a gRPC status (see the module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort_with(context, exc, method)

            return handler._replace(unary_unary=unary)
        for kind in ("unary_stream", "stream_stream"):
            inner_stream = getattr(handler, kind)
            if inner_stream is not None:
                return handler._replace(**{kind: _mapped_stream(inner_stream, method)})
        return handler  # no client-streaming methods in this service


def _mapped_stream(inner: Callable[..., AsyncIterator[Any]], method: str
                   ) -> Callable[..., AsyncIterator[Any]]:
    """A response-streaming handler whose exceptions end the RPC as ``_abort_with`` says."""
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async with contextlib.aclosing(inner(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_with(context, exc, method)
    return stream


# -- the service --------------------------------------------------------------------------------

class WorkerServicer(pb_grpc.WorkerServicer):
    """Serves one AsyncEngine. ``model_id`` is the public model id this worker answers to."""

    def __init__(self, engine: AsyncEngine, *, model_id: str, pool: str,
                 tracing: Tracing = DISABLED, metrics: WorkerMetrics | None = None):
        self._engine = engine
        self._model_id = model_id
        self._pool = pool
        self._tracing = tracing
        self._metrics = metrics
        # Abort tasks started from done-callbacks; held so they are not collected mid-flight.
        self._background: set[asyncio.Task[Any]] = set()
        # Wake-up events of the open WatchState streams, and whether they should end.
        self._watchers: set[asyncio.Event] = set()
        self._closing = False
        # Recent times to first token, read by the autoscaler through the actor's info().
        self.ttft = RecentLatencies()

    def close(self) -> None:
        """Ends every WatchState stream (they would otherwise hold a graceful stop open)."""
        self._closing = True
        for wake in self._watchers:
            wake.set()

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        run = _Run(self, request)
        # A client that cancels may leave this generator suspended at a ``yield`` that is
        # only closed when collected; abort now so the request's blocks are freed at once.
        context.add_done_callback(lambda _: run.abort())
        async for response in run.responses():
            yield response

    async def Session(self, requests: AsyncIterator[pb.SessionRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        """One router's requests on one stream: each request runs in a task of its own, as
        a Generate call would; the deltas ready together leave in one message. Ends when the
        router half-closes and its last request ended; cancelling it (the router closed its
        channel, or vanished) aborts every request still running. A router that stops
        reading it while the outbox fills past MAX_OUTBOX_ITEMS gets the Session ended with
        UNAVAILABLE (after what was sent before), which aborts every request on it too: the
        router ends them (or retries those with no output yet) as for a failed worker."""
        handler = asyncio.current_task()
        runs: dict[str, asyncio.Task[None]] = {}

        def overflowed() -> None:
            log.warning("a Session's router has not read %d deltas: ending the Session and "
                        "aborting its %d requests", MAX_OUTBOX_ITEMS, len(runs))
            task = asyncio.create_task(_end_session(context, handler, "the router read too "
                                                    "slowly: the session's outbox is full"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        outbox = _Outbox(MAX_OUTBOX_ITEMS, overflowed)

        async def serve(request: pb.GenerateRequest) -> None:
            request_id = request.request_id
            try:
                with self._tracing.request_span(request.trace_context) as span:
                    try:
                        async for response in _Run(self, request).responses():
                            outbox.delta(request_id, response)
                        outbox.end(session_end(request_id))
                    except ElectronError as exc:
                        _span_error(span, exc)
                        outbox.end(session_end(request_id, exc))
                    except Exception as exc:
                        log.exception("unexpected error in a Session request", exc_info=exc)
                        _span_error(span, exc)
                        outbox.end(session_end(request_id, ElectronError(_INTERNAL_MESSAGE)))
            finally:
                runs.pop(request_id, None)
                outbox.wake()

        async def read() -> None:
            async for message in requests:
                for request_id in message.cancel:
                    task = runs.get(request_id)
                    if task is not None:
                        task.cancel()  # the engine's iterator aborts the request
                for request in message.generate:
                    request_id = request.request_id
                    if request_id in runs:  # a second request under a live id: a broken peer
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"request id {request_id!r} is already running "
                                            "in this session")
                    runs[request_id] = asyncio.create_task(serve(request),
                                                           name=f"session-{request_id}")

        reader = asyncio.create_task(read(), name="session-reader")
        reader.add_done_callback(lambda _: outbox.wake())
        try:
            while True:
                if not outbox.pending:
                    if reader.done() and (not runs or reader.exception() is not None):
                        reader.result()  # a failed read ends the call with its error
                        return
                    await outbox.wait()
                    continue
                yield outbox.take()
        finally:
            reader.cancel()
            for task in list(runs.values()):
                task.cancel()
            await asyncio.gather(reader, *runs.values(), return_exceptions=True)

    async def Abort(self, request: pb.AbortRequest,
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not request.request_id:
            raise InvalidRequest("'request_id' must not be empty", param="request_id")
        return pb.AbortResponse(found=await self._engine.abort(request.request_id))

    async def WatchState(self, request: pb.WatchStateRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StateUpdate]:
        """A snapshot, then every KV event in order, and the load every LOAD_INTERVAL_S.

        A subscriber too slow for the event log's ring (gRPC flow control holds our writes
        back) gets a fresh snapshot instead of the events it missed.
        """
        events = self._engine.kv_events
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_event() -> None:  # engine thread; reading the flag there is benign
            if not wake.is_set():
                loop.call_soon_threadsafe(wake.set)

        remove_listener = _once(events.add_listener(on_event))
        # Detach before the loop can close even if this generator is never resumed.
        context.add_done_callback(lambda _: remove_listener())
        self._watchers.add(wake)
        try:
            sequence, hashes = events.snapshot()
            yield wire.snapshot_update(sequence, hashes, self._engine.block_size)
            next_load = loop.time()
            while not self._closing:
                if loop.time() >= next_load:
                    yield wire.load_update(self._engine.load())
                    next_load = loop.time() + LOAD_INTERVAL_S
                await _wait(wake, next_load - loop.time())
                # Clear before reading: an event recorded after the read sets it again.
                wake.clear()
                try:
                    pending = events.events_since(sequence)
                except SubscriberFellBehind:
                    sequence, hashes = events.snapshot()
                    yield wire.snapshot_update(sequence, hashes, self._engine.block_size)
                    continue
                for event in pending:
                    yield wire.event_update(event)
                    sequence = event.sequence
        finally:
            self._watchers.discard(wake)
            remove_listener()

    async def GetInfo(self, request: pb.InfoRequest,
                      context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        engine = self._engine
        return pb.WorkerInfo(worker_id=engine.worker_id, model=self._model_id,
                             block_size=engine.block_size, max_model_len=engine.max_model_len,
                             vocab_size=engine.vocab_size, pool=self._pool)


class _Run:
    """One request on the engine, as a Generate call or a Session serves it: validation,
    the engine's stream, its observation and its time to first token."""

    def __init__(self, servicer: WorkerServicer, request: pb.GenerateRequest):
        self._servicer = servicer
        self._request = request
        self._args: wire.GenerateArgs | None = None
        # True from the first output (or progress message: the engine accepted it) to the
        # last: only then is the request the engine's to abort. (Before, the engine raised
        # or is cancelled inside its own iterator, which aborts; and a rejected duplicate id
        # must not abort the original.)
        self._streaming = False

    async def responses(self) -> AsyncIterator[pb.GenerateResponse]:
        servicer = self._servicer
        args = self._args = wire.generate_args(self._request)
        request_id_var.set(args.request_id)  # this task's log lines carry the id
        if args.model and args.model != servicer._model_id:
            raise ModelNotFound(f"this worker serves {servicer._model_id!r}, not "
                                f"{args.model!r}", param="model")
        engine = servicer._engine
        outputs = engine.generate(args.request_id, list(args.prompt_token_ids), args.sampling,
                                  args.priority, args.cache_salt,
                                  progress_every_s=engine.config.progress_interval_s)
        observer = GenerationObserver(servicer._tracing, servicer._metrics, args,
                                      servicer._model_id, engine.worker_id)
        received = time.monotonic()
        first = True  # no output yet: the first one records the time to first token
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    self._streaming = True
                    if isinstance(output, Progress):  # queued or computing: alive, no delta
                        yield wire.progress_response(output)
                        continue
                    if first:  # its time to first token (the autoscaler reads them)
                        first = False
                        servicer.ttft.record(time.monotonic() - received)
                    observer.output(output)
                    if output.caused_by_request:
                        # Not the worker's failure: the router must neither retry it elsewhere
                        # nor count it against this worker (INVALID_ARGUMENT says so).
                        raise InvalidRequest(output.error or "the request could not be served")
                    yield wire.generate_response(output)
                self._streaming = False
        finally:
            observer.close()

    def abort(self) -> None:
        """Aborts the request on the engine if it is still running there."""
        if self._streaming and self._args is not None:
            servicer = self._servicer
            task = asyncio.get_running_loop().create_task(
                servicer._engine.abort(self._args.request_id))
            servicer._background.add(task)
            task.add_done_callback(servicer._background.discard)


class _Outbox:
    """A Session's deltas and ends waiting to be sent; ``take`` empties it into one message
    (at most MAX_SESSION_DELTAS deltas: one message stays far below gRPC's size limits).
    Past ``limit`` items it calls ``on_overflow`` once and holds nothing more."""

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self._deltas: list[pb.SessionDelta] = []
        self._ends: list[pb.SessionEnd] = []
        self._ready = asyncio.Event()
        self._limit = limit
        self._on_overflow = on_overflow
        self.overflowed = False

    @property
    def pending(self) -> bool:
        return bool(self._deltas or self._ends)

    def delta(self, request_id: str, response: pb.GenerateResponse) -> None:
        if self._room():
            self._deltas.append(pb.SessionDelta(request_id=request_id, response=response))
            self._ready.set()

    def end(self, end: pb.SessionEnd) -> None:
        if self._room():
            self._ends.append(end)
            self._ready.set()

    def _room(self) -> bool:
        if self.overflowed:
            return False
        if len(self._deltas) + len(self._ends) >= self._limit:
            self.overflowed = True
            self._deltas, self._ends = [], []
            self._on_overflow()
            return False
        return True

    def wake(self) -> None:
        self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()
        self._ready.clear()

    def take(self) -> pb.SessionResponse:
        deltas, self._deltas = (self._deltas[:MAX_SESSION_DELTAS],
                                self._deltas[MAX_SESSION_DELTAS:])
        # A request's end never overtakes its deltas: ends leave with the last of them.
        ends, self._ends = (self._ends, []) if not self._deltas else ([], self._ends)
        return pb.SessionResponse(deltas=deltas, ends=ends)


async def _end_session(context: grpc.aio.ServicerContext, handler: asyncio.Task[Any] | None,
                       details: str) -> None:
    """Ends a Session whose handler is stuck writing to a router that does not read: its
    status is queued behind what was sent (an abort from the handler itself would wait for
    the stuck write), then the handler is cancelled, which aborts its requests."""
    abort = asyncio.ensure_future(context.abort(grpc.StatusCode.UNAVAILABLE, details))
    await asyncio.sleep(0)  # the status is on its way before the handler's write is given up
    if handler is not None:
        handler.cancel()
    with contextlib.suppress(grpc.aio.AbortError, asyncio.CancelledError, grpc.aio.UsageError):
        await abort


def _span_error(span: Any, exc: Exception) -> None:
    if span is not None:
        span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Waits until ``event`` is set or ``timeout`` seconds pass, whichever is first."""
    if timeout <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):  # the timeout is the load tick, not a failure
        async with asyncio.timeout(timeout):
            await event.wait()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call


# -- the server ---------------------------------------------------------------------------------

class WorkerServer:
    """A started gRPC server with the Worker and health services."""

    def __init__(self, server: grpc.aio.Server, servicer: WorkerServicer,
                 health: health_aio.HealthServicer):
        self.server = server
        self._servicer = servicer
        self._health = health
        self._loop = asyncio.get_running_loop()
        self._failing: concurrent.futures.Future[None] | None = None

    def on_engine_failure(self, reason: str) -> None:
        """The engine failed for good (any thread): report NOT_SERVING (routers stop
        connecting to it) and end the WatchState streams (routers drop it at once). Its
        Generate streams were ended by the engine."""
        async def not_serving() -> None:
            for service in ("", WORKER_SERVICE):
                await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._servicer.close()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._failing = asyncio.run_coroutine_threadsafe(not_serving(), self._loop)

    def ttft_p90_s(self) -> float | None:
        """The p90 time to first token of the last few seconds' requests (None: none)."""
        return self._servicer.ttft.quantile(0.9)

    async def stop(self, grace: float | None) -> None:
        """Reports NOT_SERVING, ends the WatchState streams, then lets in-flight generations
        run for up to ``grace`` seconds before cancelling them (which aborts them)."""
        await self._health.enter_graceful_shutdown()
        self._servicer.close()
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)


async def serve_worker(
    engine: AsyncEngine,
    host: str,
    port: int = 0,
    *,
    model_id: str | None = None,
    pool: str = "default",
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tracing: Tracing = DISABLED,
    metrics: WorkerMetrics | None = None,
    token: str | None = None,
) -> tuple[WorkerServer, int]:
    """Starts the worker's gRPC server on ``host:port`` (0: any free port).

    Returns the server and the port it bound. ``model_id`` defaults to the engine's model
    name. ``interceptors`` run before the error mapping; ``tracing`` adds the Generate server
    span (outside the error mapping, so the span sees the status); ``metrics`` gets each
    finished sequence. ``token`` is the cluster token every call must carry, checked first
    (None: no check, for in-process tests and benchmarks; a worker actor always has one).
    """
    auth = [TokenServerInterceptor(token)] if token is not None else []
    server = grpc.aio.server(
        interceptors=[*auth, *interceptors, *tracing.server_interceptors(),
                      ErrorInterceptor()],
        options=SERVER_OPTIONS)
    servicer = WorkerServicer(engine, model_id=model_id or engine.model_name, pool=pool,
                              tracing=tracing, metrics=metrics)
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(_host_port(host, port))
    except RuntimeError as exc:  # gRPC's way of saying the bind failed
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    await server.start()
    # The engine is loaded (its constructor loads the model): the worker can serve now.
    for service in ("", WORKER_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("worker %s serving gRPC on %s:%d", engine.worker_id, host, bound)
    worker = WorkerServer(server, servicer, health)
    engine.add_failure_listener(worker.on_engine_failure)
    return worker, bound


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
