"""The asyncio face of the engine.

The model step runs in one dedicated thread (torch releases the GIL in its kernels), so the
event loop that serves gRPC never blocks on it. Callers submit requests and receive their
deltas through an asyncio queue; commands reach the engine thread through a locked inbox
that the thread drains between steps. A request's grammar is compiled on a helper thread
too, within ``grammar_compile_timeout_s``. The engine thread hands each step's raw outputs
to the event loop, which makes their text (detokenizing, stop strings, logprob texts:
output_processor.py) while the engine thread runs the next step; a stop string found there
comes back to the engine thread as a "stop" command.

Liveness (docs/engine.md, "Liveness"): an exception escaping the engine thread's loop, or a
step (with the commands before it) running past ``stall_timeout_s`` (a watchdog thread
measures it), fails the engine for good: ``failure`` says why, every open stream ends with
``WorkerUnavailable`` at once, new requests are refused, and the failure listeners (the gRPC
service: NOT_SERVING) are told. The fleet then replaces the worker. Sequence ids are
reserved at the door, so a request whose id collides with a live sequence (``A`` with n=2,
then ``A#1``) is refused before it can reach the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from core.config import EngineConfig
from core.errors import InvalidRequest, WorkerUnavailable
from core.tokenizer import Tokenizer

from .engine import Engine, grammar_source, sequence_ids
from .kv_events import KVEventLog
from .model_runner import ModelRunner
from .output_processor import make_outputs
from .outputs import Progress, RequestOutput
from .request import Request
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadInfo:
    running: int
    waiting: int
    waiting_prefill_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    running_decode_tokens: int


@dataclass(frozen=True)
class _Failed:
    reason: str


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | _Failed]
    request_ids: list[str]


class AsyncEngine:
    def __init__(self, config: EngineConfig, worker_id: str = "worker-0",
                 model_id: str | None = None):
        """``model_id`` is the public model id; it goes into every block hash (with the
        tenant salt), so routers compute the same hashes whatever path the files are at."""
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.worker_id = worker_id
        runner = ModelRunner(config)
        self.tokenizer = Tokenizer.from_model_path(runner.model_path)
        self.engine = Engine(runner, self.tokenizer, config, model_name=model_id or config.model)
        self.model_name = model_id or config.model
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.vocab_size = self.engine.vocab_size
        self._streams: dict[str, _Stream] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        # Every live sequence id (reserved at the door, released when its last output is
        # made); guarded by ``_wake``.
        self._live: set[str] = set()
        # Why the engine failed (None: it serves); set once, by ``_fail``.
        self.failure: str | None = None
        self._failure_listeners: list[Callable[[str], None]] = []
        # When the engine thread started its current step (None: between steps).
        self._busy_since: float | None = None
        self._compiles = ThreadPoolExecutor(1, thread_name_prefix=f"grammar-compile-{worker_id}")
        # Called from the engine thread with each non-idle step's seconds (worker metrics).
        self.step_observer: Callable[[float], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}",
                                        daemon=True)
        self._thread.start()
        self._watchdog_stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"engine-watchdog-{worker_id}",
                                          daemon=True)
        self._watchdog.start()

    # -- public API --------------------------------------------------------------------------

    @property
    def kv_events(self) -> KVEventLog:
        return self.engine.kv.event_log

    def load(self) -> LoadInfo:
        s, kv = self.engine.scheduler, self.engine.kv
        return LoadInfo(s.num_running, s.num_waiting, s.waiting_prefill_tokens,
                        kv.num_used_blocks, kv.num_total_blocks, s.running_decode_tokens)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingParams, priority: int = 0, cache_salt: str = "", *,
                       progress_every_s: float | None = None,
                       ) -> AsyncIterator[RequestOutput | Progress]:
        """Streams the request's deltas; the last delta of each of its n sequences is final.

        Bad input raises (InvalidRequest, ContextLengthExceeded) before anything is queued;
        so does an id that collides with a live sequence's. ``progress_every_s``: a
        ``Progress`` is yielded whenever the request produced nothing for that long (None:
        only outputs). A failed engine ends the stream with WorkerUnavailable. Leaving the
        iterator early (cancellation, client gone) aborts the request.
        """
        ids = sequence_ids(request_id, sampling.n)
        self._reserve(ids)
        stream: _Stream | None = None
        try:
            requests = await self._make_requests(request_id, prompt_token_ids, sampling,
                                                 priority, cache_salt)
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), ids)
            with self._wake:
                self._check_serving()
                self._streams[request_id] = stream
                self._inbox.append(("add", requests))
                self._wake.notify()
        finally:
            if stream is None or self._streams.get(request_id) is not stream:
                self._release(ids)
        remaining = len(requests)
        try:
            while remaining:
                try:
                    async with asyncio.timeout(progress_every_s):
                        out = await stream.queue.get()
                except TimeoutError:
                    yield self._progress(ids)
                    continue
                if isinstance(out, _Failed):
                    raise WorkerUnavailable("the worker's engine failed")
                if out.finished:
                    remaining -= 1
                yield out
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if remaining:
                self._submit("abort", stream.request_ids)

    def _check_serving(self) -> None:
        if self._stopped:
            raise WorkerUnavailable("this worker is shutting down")
        if self.failure is not None:
            raise WorkerUnavailable("this worker's engine failed")

    def _reserve(self, ids: list[str]) -> None:
        """Claims a request's sequence ids, or refuses it (shutting down, failed, or an id
        that a live sequence holds)."""
        with self._wake:
            self._check_serving()
            # A stream whose consumer has not closed it yet still holds its id.
            clash = ids[0] if ids[0] in self._streams else next(
                (i for i in ids if i in self._live), None)
            if clash is not None:
                which = "is already running" if clash in self._streams else \
                    f"collides with a running request's sequence {clash!r}"
                raise InvalidRequest(f"request id {ids[0]!r} {which}", param="request_id")
            self._live.update(ids)

    def _release(self, ids: list[str]) -> None:
        with self._wake:
            self._live.difference_update(ids)

    async def _make_requests(self, request_id: str, prompt_token_ids: list[int],
                             sampling: SamplingParams, priority: int,
                             cache_salt: str) -> list[Request]:
        """The engine's validation; with a grammar, on the compile thread (a large schema
        takes seconds to compile: never on the event loop), within its time budget."""
        make = self.engine.make_requests
        if sampling.grammar is None:
            return make(request_id, prompt_token_ids, sampling, priority, cache_salt)
        budget = self.config.grammar_compile_timeout_s
        future = self._compiles.submit(make, request_id, prompt_token_ids, sampling, priority,
                                       cache_salt)
        try:
            async with asyncio.timeout(budget):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            # It compiles on in the background (and lands in the grammar cache); a compile
            # waiting for the thread is dropped.
            future.cancel()
            source = grammar_source(sampling)
            raise InvalidRequest(f"this request's {source} took more than {budget:g} s to "
                                 "compile; simplify it", param=source) from None

    def _progress(self, ids: list[str]) -> Progress:
        """Where a request stands (read from the event loop: a hint, not a promise)."""
        scheduler = self.engine.scheduler
        for sequence_id in ids:
            if scheduler.get_request(sequence_id) is None:
                continue
            position = scheduler.queue_position(sequence_id)
            if position is None:
                return Progress(queued=False)
            return Progress(queued=True, queue_position=position)
        # Still in the inbox: behind every request waiting now.
        return Progress(queued=True, queue_position=scheduler.num_waiting)

    async def abort(self, request_id: str) -> bool:
        """Aborts a running request; its stream ends with finish_reason "abort"."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        self._submit("abort", stream.request_ids)
        return True

    def add_failure_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(reason)`` is called once if the engine fails (at once if it has), from
        whichever thread noticed: it must be thread-safe."""
        with self._wake:
            failure = self.failure
            if failure is None:
                self._failure_listeners.append(listener)
        if failure is not None:
            listener(failure)

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._watchdog_stop.set()
        self._compiles.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=10)

    # -- engine thread -----------------------------------------------------------------------

    def _submit(self, kind: str, payload: object) -> None:
        with self._wake:
            if self.failure is not None:
                return  # nobody would read it
            self._inbox.append((kind, payload))
            self._wake.notify()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - the engine is failed, not the process
            log.critical("the engine thread died", exc_info=exc)
            self._fail(f"the engine thread died: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while (not self._inbox and not engine.has_unfinished and not self._stopped
                       and self.failure is None):
                    self._wake.wait()
                if engine.idle and not self._inbox and not self._stopped:
                    self._wake.wait(timeout=0.005)  # nothing runnable: do not spin
                if self.failure is not None:
                    return  # failed from outside (a stall): its streams are ended
                if self._stopped:
                    break
                commands = list(self._inbox)
                self._inbox.clear()
            self._busy_since = time.monotonic()
            outputs: list[RequestOutput] = []
            for kind, payload in commands:
                if kind == "add":
                    engine.add(payload)  # type: ignore[arg-type]
                elif kind == "stop":
                    outputs.extend(engine.stop_sequences(payload))  # type: ignore[arg-type]
                else:
                    outputs.extend(engine.abort_sequences(payload))  # type: ignore[arg-type]
            started = time.perf_counter()
            outputs.extend(engine.run_step())
            if self.step_observer is not None and not engine.idle:
                self.step_observer(time.perf_counter() - started)
            self._busy_since = None
            self._deliver(outputs)
        # Shutting down: end every open stream so no caller waits forever.
        live = [rid for s in list(self._streams.values()) for rid in s.request_ids]
        self._deliver(engine.abort_sequences(live))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands a step's raw outputs to their streams' event loops (engine thread)."""
        by_stream: dict[int, tuple[_Stream, list[RequestOutput]]] = {}
        done: list[str] = []
        for out in outputs:
            if out.finished:
                done.append(out.request_id if out.index == 0 else f"{out.request_id}#{out.index}")
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_stream.setdefault(id(stream), (stream, []))[1].append(out)
        if done:
            self._release(done)
        with self._wake:
            if self.failure is not None:
                return  # its streams were ended with the failure
            # One hand-over per event loop per step: every stream of the step wakes in the
            # same loop iteration, so a Session sends all their deltas in one message (a loop
            # woken per stream would send the first one alone while this thread still posts).
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[
                asyncio.Queue[RequestOutput | _Failed], list[RequestOutput]]]] = {}
            for stream, outs in by_stream.values():
                by_loop.setdefault(stream.loop, []).append((stream.queue, outs))
            for loop, batch in by_loop.items():
                loop.call_soon_threadsafe(self._hand_over, batch)

    def _hand_over(self, batch: list[tuple[asyncio.Queue[RequestOutput | _Failed],
                                            list[RequestOutput]]]) -> None:
        """Makes a step's outputs and puts them in their streams' queues (event loop): right
        away, whether or not their consumers read, so a stop string stops its sequence
        within a step even for a stalled reader."""
        stop: list[str] = []
        for queue, raws in batch:
            try:
                made, stopped = make_outputs(raws)
            except Exception:  # noqa: BLE001 - this stream fails, the others go on
                log.exception("making a request's output failed")
                queue.put_nowait(_Failed("its output could not be made"))
                continue
            stop.extend(stopped)
            for out in made:
                queue.put_nowait(out)
        if stop:
            self._submit("stop", stop)

    # -- failure -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """The watchdog thread: fails the engine when a step outruns ``stall_timeout_s`` or
        the engine thread is gone without a shutdown."""
        limit = self.config.stall_timeout_s
        while not self._watchdog_stop.wait(min(0.5, limit / 4)):
            if self.failure is not None or self._stopped:
                return
            since = self._busy_since
            if since is not None and time.monotonic() - since > limit:
                self._fail(f"a step has run for more than {limit:g} s "
                           "(engine.stall_timeout_s)")
                return
            if not self._thread.is_alive():
                self._fail("the engine thread is gone")
                return

    def _fail(self, reason: str) -> None:
        """Fails the engine for good (any thread): ends every open stream, tells the
        listeners. The first failure wins."""
        with self._wake:
            if self.failure is not None or self._stopped:
                return
            self.failure = reason
            streams = list(self._streams.values())
            listeners, self._failure_listeners = self._failure_listeners, []
            self._wake.notify()
        log.critical("worker %s: engine failed: %s; ending %d streams", self.worker_id, reason,
                     len(streams))
        # The listeners first (the worker turns NOT_SERVING): a caller whose stream ends with
        # the failure finds the worker already reporting it.
        for listener in listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001 - the others must still hear it
                log.exception("an engine failure listener failed")
        failed = _Failed(reason)
        for stream in streams:
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, failed)


__all__ = ["AsyncEngine", "LoadInfo", "Progress", "Request"]
