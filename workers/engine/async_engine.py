"""The asyncio face of the engine.

The model step runs in one dedicated thread (torch releases the GIL in its kernels), so the
event loop that serves gRPC never blocks on it. Callers submit requests and receive their
deltas through an asyncio queue; commands reach the engine thread through a locked inbox
that the thread drains between steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from core.config import EngineConfig
from core.errors import InvalidRequest, WorkerUnavailable
from core.tokenizer import Tokenizer

from .engine import Engine
from .kv_events import KVEventLog
from .model_runner import ModelRunner
from .outputs import RequestOutput
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


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
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
        # Called from the engine thread with each non-idle step's seconds (worker metrics).
        self.step_observer: Callable[[float], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}",
                                        daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------------------------

    @property
    def kv_events(self) -> KVEventLog:
        return self.engine.kv.event_log

    def load(self) -> LoadInfo:
        s, kv = self.engine.scheduler, self.engine.kv
        return LoadInfo(s.num_running, s.num_waiting, s.waiting_prefill_tokens,
                        kv.num_used_blocks, kv.num_total_blocks, s.running_decode_tokens)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingParams, priority: int = 0,
                       cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas; the last delta of each of its n sequences is final.

        Bad input raises (InvalidRequest, ContextLengthExceeded) before anything is queued.
        Leaving the iterator early (cancellation, client gone) aborts the request.
        """
        if self._stopped:
            raise WorkerUnavailable("this worker is shutting down")
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already running",
                                 param="request_id")
        requests = self.engine.make_requests(request_id, prompt_token_ids, sampling, priority,
                                             cache_salt)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         [r.request_id for r in requests])
        self._streams[request_id] = stream
        self._submit("add", requests)
        remaining = len(requests)
        try:
            while remaining:
                out = await stream.queue.get()
                if out.finished:
                    remaining -= 1
                yield out
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self._submit("abort", stream.request_ids)

    async def abort(self, request_id: str) -> bool:
        """Aborts a running request; its stream ends with finish_reason "abort"."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        self._submit("abort", stream.request_ids)
        return True

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- engine thread -----------------------------------------------------------------------

    def _submit(self, kind: str, payload: object) -> None:
        with self._wake:
            self._inbox.append((kind, payload))
            self._wake.notify()

    def _run(self) -> None:
        engine = self.engine
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._inbox and not engine.has_unfinished and not self._stopped:
                        self._wake.wait()
                    if engine.idle and not self._inbox and not self._stopped:
                        self._wake.wait(timeout=0.005)  # nothing runnable: do not spin
                    if self._stopped:
                        break
                    commands = list(self._inbox)
                    self._inbox.clear()
                outputs: list[RequestOutput] = []
                for kind, payload in commands:
                    if kind == "add":
                        engine.add(payload)  # type: ignore[arg-type]
                    else:
                        outputs.extend(engine.abort(payload))  # type: ignore[arg-type]
                started = time.perf_counter()
                outputs.extend(engine.step())
                if self.step_observer is not None and not engine.idle:
                    self.step_observer(time.perf_counter() - started)
                self._deliver(outputs)
            # Shutting down: end every open stream so no caller waits forever.
            live = [rid for s in list(self._streams.values()) for rid in s.request_ids]
            self._deliver(engine.abort(live))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_stream: dict[int, tuple[_Stream, list[RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_stream.setdefault(id(stream), (stream, []))[1].append(out)
        # One hand-over per event loop per step: every stream of the step wakes in the same
        # loop iteration, so a Session sends all their deltas in one message (a loop woken
        # per stream would send the first one alone while this thread still posts).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput],
                                                            list[RequestOutput]]]] = {}
        for stream, outs in by_stream.values():
            by_loop.setdefault(stream.loop, []).append((stream.queue, outs))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue[RequestOutput], list[RequestOutput]]]) -> None:
    for queue, outs in batch:
        for out in outs:
            queue.put_nowait(out)


__all__ = ["AsyncEngine", "LoadInfo", "Request"]
