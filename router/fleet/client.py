"""One worker as the router sees it: its gRPC channel, its info, its live state.

``WorkerClient`` owns one ``grpc.aio`` channel to one worker. ``connect`` reads the worker's
``GetInfo`` and starts a task consuming its ``WatchState`` stream, which keeps the latest
``WorkerLoad`` and feeds the block hashes cached there into the router's prefix index
(``cached_blocks``, this worker's handle there: snapshot, then consecutive events; a gap in
sequence numbers re-opens the stream, whose first message is a fresh snapshot). When that
stream ends or fails, the worker is gone (or going: a stopping worker ends it first) and
``on_broken`` tells the pool at once. Closing the client purges the worker from the index.

``generate`` sends a request on the worker's ``Session``: one long-lived bidirectional stream
carries all of this router's requests to the worker, so a request costs no gRPC call of its
own, and the deltas the worker has ready together (every request's of one engine step)
arrive in one message (docs/architecture.md, "The Session"). Cancelling the returned stream
tells the worker, which aborts the request and frees its blocks.

Errors come back as the ``core.errors`` taxonomy (``core.protocol``): a worker's own error
for a request is rebuilt as the same class; a worker that failed, vanished or timed out, or
a Session that broke, is ``WorkerUnavailable``, which the router may retry elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import Span, StatusCode

from core.cluster_token import token_client_interceptors, token_metadata
from core.errors import ElectronError, InternalError, InvalidRequest, WorkerUnavailable
from core.pb.electron.v1 import worker_pb2 as pb
from core.pb.electron.v1 import worker_pb2_grpc as pb_grpc
from core.protocol import WORKER_SERVICE, error_from_rpc, error_from_session_end
from core.telemetry import DISABLED, Tracing
from router.routing.load import CountsLocalLoad, LocalLoad, WorkerLoad
from router.routing.prefix_index import PrefixIndex
from router.telemetry import observe

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Ping the worker so a peer that vanished without a FIN breaks the WatchState stream.
    # 5 s is the most often the worker's server accepts pings (workers/grpc_service.py).
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted worker on the same address is reachable again quickly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Snapshots of a large cache: ~10 bytes per block hash.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
# A Session message holds queued requests up to this size (at least one request), and one
# request may be at most MAX_REQUEST_BYTES encoded: the worker accepts messages up to
# workers/grpc_service.py's MAX_RECEIVE_BYTES.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT_S = 2.0


class Endpoint(Protocol):
    """cluster.registry.WorkerEndpoint, as far as the client needs it."""

    @property
    def worker_id(self) -> str: ...

    @property
    def address(self) -> str: ...


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    model: str
    block_size: int
    max_model_len: int
    vocab_size: int
    pool: str


def _load_of(msg: pb.Load) -> WorkerLoad:
    return WorkerLoad(running=msg.running, waiting=msg.waiting,
                      waiting_prefill_tokens=msg.waiting_prefill_tokens,
                      kv_blocks_used=msg.kv_blocks_used, kv_blocks_total=msg.kv_blocks_total,
                      running_decode_tokens=msg.running_decode_tokens)


# -- the Session: every request of this router to one worker --------------------------------------

class GenerateStream:
    """The responses of one request (a Session's, see ``Session``). ``cancel()``
    (idempotent, any time) gives the request up: the worker aborts it and frees its blocks;
    reaching the end releases it too. Each delta is reported to the request's
    ``observe.Observation``; the request's client span (if traced) ends with it."""

    __slots__ = ("_session", "request_id", "_done", "_observation", "_span", "_deltas",
                 "_end", "_waiter", "heard", "_silence", "_silence_timer")

    def __init__(self, session: Session, request_id: str,
                 observation: observe.Observation | None, span: Span | None):
        self._session = session
        self.request_id = request_id
        self._done = False
        self._observation = observation
        self._span = span
        self._deltas: collections.deque[pb.GenerateResponse] = collections.deque()
        self._end: pb.SessionEnd | ElectronError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.heard = 0.0  # loop time of the last message from the worker (the reader sets it)
        self._silence: tuple[float, str] = (0.0, "")
        self._silence_timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> GenerateStream:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        while not self._deltas:
            end = self._end
            if end is not None:
                raise self._ended(end)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._waiter = None
        message = self._deltas.popleft()
        if self._observation is not None and not message.HasField("progress"):
            self._observation.delta()  # a progress message is no delta
        return message

    @property
    def ready(self) -> bool:
        """A delta (not a progress message) or the end is here: the next read of output
        will not wait."""
        if self._deltas:
            return not self._deltas[0].HasField("progress")
        return self._end is not None

    def _ended(self, end: pb.SessionEnd | ElectronError) -> BaseException:
        """What reading past the end raises: StopAsyncIteration, or the request's error."""
        error = end if isinstance(end, ElectronError) else (
            error_from_session_end(end, self._session.worker_id) if end.status else None)
        if error is not None and self._span is not None:
            self._span.set_status(StatusCode.ERROR, error.message)
        self.cancel()
        return StopAsyncIteration() if error is None else error

    # The Session's reader calls these.
    def _deliver(self, response: pb.GenerateResponse) -> None:
        self._deltas.append(response)
        self._wake()

    def _finish(self, end: pb.SessionEnd | ElectronError) -> None:
        if self._end is None:
            self._end = end
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def watch_silence(self, limit_s: float, what: str) -> None:
        """From now on, ``limit_s`` seconds with nothing from the worker (no delta, no
        progress message) end the stream with ``WorkerUnavailable`` ("<what>: it sent nothing
        for N s") and give the request up at the worker. One timer per limit, re-armed from
        the last message's time when it fires: a delta only notes its time (an
        ``asyncio.timeout`` around every read cost ~4 us a delta)."""
        loop = asyncio.get_running_loop()
        self.heard = loop.time()
        self._silence = (limit_s, what)
        if self._silence_timer is not None:
            self._silence_timer.cancel()
        self._silence_timer = loop.call_at(self.heard + limit_s, self._check_silence)

    def _check_silence(self) -> None:
        self._silence_timer = None
        if self._end is not None or self._done:
            return
        limit_s, what = self._silence
        due = self.heard + limit_s
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self.interrupt(WorkerUnavailable(f"{what}: it sent nothing for {limit_s:g} s"))
        else:
            self._silence_timer = loop.call_at(due, self._check_silence)

    def interrupt(self, error: ElectronError) -> None:
        """Ends the stream with ``error`` (its reader gets the deltas already here, then the
        error) and gives the request up at the worker."""
        if self._end is None:
            self._end = error
            self._session.cancel(self.request_id)
            self._wake()

    def cancel(self) -> None:
        if self._end is None:
            self._end = WorkerUnavailable("the request was cancelled")
            self._session.cancel(self.request_id)
        if not self._done:
            self._done = True
            if self._silence_timer is not None:
                self._silence_timer.cancel()
                self._silence_timer = None
            if self._span is not None:
                self._span.end()


class Session:
    """This router's requests to one worker on one ``Session`` stream (opened on first use,
    and again after it breaks). ``open`` queues a request; a writer task sends whatever was
    queued together in one message, and a reader task hands each delta to its request's
    ``GenerateStream``. When the stream breaks (the worker failed, vanished or stopped),
    every request on it ends with ``WorkerUnavailable``, as its own call would have."""

    def __init__(self, stub: pb_grpc.WorkerStub, worker_id: str,
                 metadata: tuple[tuple[str, str], ...] | None = None):
        self._stub = stub
        self.worker_id = worker_id
        # The cluster token, sent with the call itself: a stream-stream interceptor would
        # put a queue and a generator between this hot stream and every write and read.
        self._metadata = metadata
        self._streams: dict[str, GenerateStream] = {}
        self._starts: list[pb.GenerateRequest] = []
        self._cancels: list[str] = []
        self._wake = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def open_requests(self) -> int:
        return len(self._streams)

    def open(self, request: pb.GenerateRequest, observation: observe.Observation | None = None,
             span: Span | None = None) -> GenerateStream:
        """Sends ``request``; its responses come on the returned stream."""
        if self._closing:
            raise WorkerUnavailable(f"worker {self.worker_id} is leaving routing")
        size = request.ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise InvalidRequest(f"the request is too large to send to a worker ({size} bytes "
                                 f"encoded; at most {MAX_REQUEST_BYTES})")
        request_id = request.request_id
        if request_id in self._streams:
            raise InternalError(f"request id {request_id!r} is already open on this worker")
        if self._call is None:
            self._connect()
        stream = GenerateStream(self, request_id, observation, span)
        self._streams[request_id] = stream
        self._starts.append(request)
        self._wake.set()
        return stream

    def cancel(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self._call is not None:
            self._cancels.append(request_id)
            self._wake.set()
        elif self._closing:
            self._wake.set()  # the writer half-closes once nothing is open

    def _connect(self) -> None:
        # wait_for_ready=False: a worker that cannot be reached fails at once, and the
        # router tries another instead of queueing behind a dead connection.
        call = self._stub.Session(wait_for_ready=False, metadata=self._metadata)
        self._call = call
        self._tasks = [asyncio.create_task(self._write(call), name=f"session-w-{self.worker_id}"),
                       asyncio.create_task(self._read(call), name=f"session-r-{self.worker_id}")]

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._starts or self._cancels:
                    await call.write(self._next_message())
                if self._closing and not self._streams:
                    await call.done_writing()
                    return
        except Exception as exc:  # the call ended under the write (grpc raises several kinds)
            log.debug("worker %s: session write failed: %r", self.worker_id, exc)
            call.cancel()  # the reader sees the call end and fails what is open on it

    def _next_message(self) -> pb.SessionRequest:
        """The queued cancels, and queued requests up to MAX_MESSAGE_BYTES (at least one)."""
        message = pb.SessionRequest(cancel=self._cancels)
        self._cancels = []
        size, taken = 0, 0
        for request in self._starts:
            size += request.ByteSize()
            if taken and size > MAX_MESSAGE_BYTES:
                break
            taken += 1
        message.generate.extend(self._starts[:taken])
        del self._starts[:taken]
        return message

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: ElectronError = WorkerUnavailable(
            f"worker {self.worker_id} ended the session")
        try:
            streams = self._streams
            loop = asyncio.get_running_loop()
            async for message in call:
                now = loop.time()
                for delta in message.deltas:
                    stream = streams.get(delta.request_id)
                    if stream is not None:
                        stream.heard = now
                        stream._deliver(delta.response)
                for end in message.ends:
                    stream = streams.pop(end.request_id, None)
                    if stream is not None:
                        stream._finish(end)
                if self._closing and not streams:
                    self._wake.set()  # the writer half-closes
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc, self.worker_id)
        except asyncio.CancelledError:
            error = WorkerUnavailable(f"the connection to worker {self.worker_id} was closed")
            raise
        finally:
            self._broken(call, error)

    def _broken(self, call: grpc.aio.StreamStreamCall, error: ElectronError) -> None:
        """The stream ended: every request on it ends with ``error``; the next ``open``
        starts a new stream."""
        if self._call is call:
            self._call = None
            current = asyncio.current_task()
            for task in self._tasks:
                if task is not current:
                    task.cancel()
        streams, self._streams = self._streams, {}
        self._starts, self._cancels = [], []
        for stream in streams.values():
            stream._finish(error if isinstance(error, WorkerUnavailable)
                           else WorkerUnavailable(f"worker {self.worker_id}: {error.message}"))

    def close_when_idle(self) -> None:
        """Takes no more requests; the stream half-closes (and the worker ends it) as soon
        as the requests on it are over."""
        self._closing = True
        self._wake.set()

    async def close(self) -> None:
        call = self._call
        if call is not None:
            call.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the client ---------------------------------------------------------------------------------------

class WorkerClient(CountsLocalLoad):
    """A connected worker, a ``router.routing.load.WorkerView``: its last load report, and
    ``local``, this router's own requests there (the pool assigns them)."""

    def __init__(self, endpoint: Endpoint, *, index: PrefixIndex | None = None,
                 on_broken: Callable[[WorkerClient], None] | None = None,
                 tracing: Tracing = DISABLED, token: str | None = None):
        """``index`` is the router's prefix index (None: one of its own); ``tracing``
        traces the Generate calls; ``token`` is the cluster token every call carries."""
        self.endpoint = endpoint
        self.worker_id = endpoint.worker_id
        self.address = endpoint.address
        # Its worker pool, as the registry lists it (requests route within a pool).
        self.pool: str = getattr(endpoint, "pool", "default")
        self.info: WorkerInfo | None = None
        self.load = WorkerLoad()
        self.load_time: float | None = None  # monotonic time of the last load report
        self.cached_blocks = (index if index is not None else PrefixIndex()).join(self.worker_id)
        self.local = LocalLoad()
        self.broken = False
        self._on_broken = on_broken
        self._tracing = tracing
        self._closing = False
        self._channel = grpc.aio.insecure_channel(
            endpoint.address, options=CHANNEL_OPTIONS,
            interceptors=token_client_interceptors(token))
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._session = Session(self._stub, self.worker_id, token_metadata(token))
        self._watch_task: asyncio.Task[None] | None = None


    async def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> WorkerInfo:
        """Checks that the worker is serving, reads its info and starts watching its state;
        raises WorkerUnavailable. (A worker that is shutting down reports NOT_SERVING while
        it drains: it must not be connected again just because a registry still lists it.)"""
        try:
            health = await self._health.Check(
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout,
                wait_for_ready=True)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
                raise WorkerUnavailable(f"worker {self.worker_id} is not serving ({status})")
            msg = await self._stub.GetInfo(pb.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.worker_id) from None
        self.info = WorkerInfo(worker_id=msg.worker_id or self.worker_id, model=msg.model,
                               block_size=msg.block_size, max_model_len=msg.max_model_len,
                               vocab_size=msg.vocab_size, pool=msg.pool)
        self._watch_task = asyncio.create_task(self._watch_state(),
                                               name=f"watch-state-{self.worker_id}")
        return self.info

    async def generate(self, request: pb.GenerateRequest) -> GenerateStream:
        """Sends ``request`` on this worker's Session; its responses come on the stream."""
        observation = observe.current()
        if observation is not None:
            observation.dispatched()
        span, carrier = self._tracing.start_generate_span(self.worker_id, self.address)
        if span is not None:
            request.trace_context.clear()  # a retry's request carries the new span's
            request.trace_context.update(carrier)
        try:
            return self._session.open(request, observation=observation, span=span)
        except BaseException:
            if span is not None:
                span.end()
            raise

    async def close(self, grace: float | None = None) -> None:
        """Stops watching and closes the channel; calls still running after ``grace``
        seconds are cancelled (None: at once)."""
        self._closing = True
        self.cached_blocks.leave()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        self._session.close_when_idle()
        await self._channel.close(grace)
        await self._session.close()

    # -- WatchState

    async def _watch_state(self) -> None:
        reason = "the state stream ended"
        try:
            while not self._closing:
                call = self._stub.WatchState(pb.WatchStateRequest())
                try:
                    in_sync = await self._consume(call)
                finally:
                    call.cancel()
                if in_sync:
                    break  # the worker ended the stream: it is stopping
                log.info("worker %s: KV event sequence gap, resyncing", self.worker_id)
        except grpc.aio.AioRpcError as exc:
            reason = f"the state stream failed: {exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            if self._closing:
                raise
            reason = "the state stream was cancelled"
            raise
        except Exception:
            log.exception("worker %s: state stream consumer failed", self.worker_id)
            reason = "the state stream consumer failed"
        finally:
            if not self._closing:
                self._mark_broken(reason)

    async def _consume(self, call: grpc.aio.UnaryStreamCall) -> bool:
        """Applies state updates until the stream ends (True) or skips an event (False)."""
        blocks = self.cached_blocks
        async for update in call:
            kind = update.WhichOneof("update")
            if kind == "load":
                self.load = _load_of(update.load)
                self.load_time = time.monotonic()
            elif kind == "snapshot":
                blocks.reset(update.snapshot.sequence, update.snapshot.block_hashes)
            elif kind == "event":
                event = update.event
                which = event.WhichOneof("kind")
                if which == "stored":
                    applied = blocks.store(event.sequence, event.stored.block_hashes)
                elif which == "removed":
                    applied = blocks.remove(event.sequence, event.removed.block_hashes)
                elif which == "cleared":
                    applied = blocks.clear(event.sequence)
                else:
                    raise InternalError(f"worker {self.worker_id} sent a KV event of unknown "
                                        f"kind {which!r}")
                if not applied:
                    return False
        return True

    def _mark_broken(self, reason: str) -> None:
        if self.broken:
            return
        self.broken = True
        log.warning("worker %s at %s is gone: %s", self.worker_id, self.address, reason)
        if self._on_broken is not None:
            self._on_broken(self)
