"""One worker as the router sees it: its gRPC channel, its info, its live state.

``WorkerClient`` owns one ``grpc.aio`` channel to one worker. ``connect`` reads the worker's
``GetInfo`` and starts a task consuming its ``WatchState`` stream, which keeps the latest
``WorkerLoad`` and feeds the block hashes cached there into the router's prefix index
(``cached_blocks``, this worker's handle there: snapshot, then consecutive events; a gap in
sequence numbers re-opens the stream, whose first message is a fresh snapshot). When that
stream ends or fails, the worker is gone (or going: a stopping worker ends it first) and
``on_broken`` tells the pool at once. Closing the client purges the worker from the index.

``generate`` opens a server-streaming ``Generate`` call; cancelling the returned stream
cancels the call, and the worker aborts the request and frees its blocks.

gRPC errors come back as the ``core.errors`` taxonomy (``core.protocol.error_from_rpc``): a
worker's own error is rebuilt as the same class; a worker that failed, vanished or timed out is
``WorkerUnavailable``, which the router may retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import Span, StatusCode

from core.errors import InternalError, WorkerUnavailable
from core.pb.electron.v1 import worker_pb2 as pb
from core.pb.electron.v1 import worker_pb2_grpc as pb_grpc
from core.protocol import WORKER_SERVICE, error_from_rpc
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
# Thousands of concurrent calls on one aio channel start failing with CANCELLED (docs/operations-notes.md#grpc-bound-concurrent-calls-per-channel);
# 500 were fine: bound each channel's concurrent Generate calls below that.
MAX_CONCURRENT_CALLS = 400
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


# -- one Generate call ------------------------------------------------------------------------------

class GenerateStream:
    """The responses of one Generate call. ``cancel()`` (idempotent, any time) ends the call
    and makes the worker abort the request; reaching the end releases it too. Each delta is
    reported to the request's ``observe.Observation``; the call's client span (if traced)
    ends with the call."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, worker_id: str,
                 release: Callable[[], None], observation: observe.Observation | None = None,
                 span: Span | None = None):
        self._call = call
        self._worker_id = worker_id
        self._release: Callable[[], None] | None = release
        self._observation = observation
        self._span = span

    def __aiter__(self) -> GenerateStream:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            if self._span is not None:
                self._span.set_status(StatusCode.ERROR, f"{exc.code().name}: {exc.details()}")
                self._span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
            self.cancel()
            raise error_from_rpc(exc, self._worker_id) from None
        except asyncio.CancelledError:
            self.cancel()
            raise
        if message is grpc.aio.EOF:
            self.cancel()
            raise StopAsyncIteration
        if self._observation is not None and not message.HasField("progress"):
            self._observation.delta()  # a progress message is no delta
        return message

    def cancel(self) -> None:
        self._call.cancel()  # no-op once the call has ended
        if self._release is not None:
            release, self._release = self._release, None
            release()
            if self._span is not None:
                self._span.end()


# -- the client ---------------------------------------------------------------------------------------

class WorkerClient(CountsLocalLoad):
    """A connected worker, a ``router.routing.load.WorkerView``: its last load report, and
    ``local``, this router's own requests there (the pool assigns them)."""

    def __init__(self, endpoint: Endpoint, *, index: PrefixIndex | None = None,
                 on_broken: Callable[[WorkerClient], None] | None = None,
                 tracing: Tracing = DISABLED):
        """``index`` is the router's prefix index (None: one of its own); ``tracing``
        traces the Generate calls."""
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
        self._channel = grpc.aio.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
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
        """Starts a Generate call (waiting for a free slot on this channel)."""
        await self._slots.acquire()
        observation = observe.current()
        if observation is not None:
            observation.dispatched()
        span, metadata = self._tracing.start_generate_span(self.worker_id, self.address)
        try:
            # wait_for_ready=False: a worker that cannot be reached fails at once, and the
            # router tries another instead of queueing behind a dead connection.
            call = self._stub.Generate(request, wait_for_ready=False,
                                       metadata=metadata or None)
        except BaseException:
            self._slots.release()
            if span is not None:
                span.end()
            raise
        return GenerateStream(call, self.worker_id, self._slots.release, observation, span)

    async def close(self, grace: float | None = None) -> None:
        """Stops watching and closes the channel; calls still running after ``grace``
        seconds are cancelled (None: at once)."""
        self._closing = True
        self.cached_blocks.leave()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        await self._channel.close(grace)

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
