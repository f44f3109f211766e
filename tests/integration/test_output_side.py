"""The output side (workers/engine/output_processor.py) on the tiny random-weight Llama: an
AsyncEngine makes text, stop strings and logprob texts on its event loop, never on the
engine thread; a stop string found there stops the sequence one step later at most, yet
the caller gets exactly what the synchronous engine gives (text cut before the stop string,
the same tokens, logprobs and usage: the extra step's token is neither shown nor billed);
and a reader that stops reading is stopped by its stop string all the same."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
import weakref
from typing import Any

import pytest
import torch

from core.config import EngineConfig
from core.tokenizer import Tokenizer
from tests.support.smollm_engine import assert_no_leaked_blocks
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine import detokenizer
from workers.engine.async_engine import AsyncEngine
from workers.engine.engine import Engine
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import FinishReason
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [300, 301, 302], "c": [1000, 40, 41, 42, 43, 44]}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> EngineConfig:
    model = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))
    return EngineConfig(model=str(model), dtype="float32", device="cpu",
                        kv_cache_bytes=4 * 2**20, max_model_len=256, torch_threads=1)


@pytest.fixture(scope="module")
def sync_engine(config) -> Engine:
    return Engine(ModelRunner(config), Tokenizer.from_model_path(config.model), config,
                  model_name="electron")


@pytest.fixture
def engine(config):
    eng = AsyncEngine(config, worker_id="out", model_id="electron")
    yield eng
    eng.shutdown()


def slow_steps(engine: AsyncEngine, seconds: float) -> None:
    """Every forward pass takes at least ``seconds``: the event loop then always makes a
    step's outputs while the engine thread already runs the next one."""
    execute = engine.engine.runner.execute

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return execute(*args, **kwargs)

    engine.engine.runner.execute = slow


def run_sync(engine: Engine, request_id: str, ids: list[int],
             params: SamplingParams) -> dict[str, Any]:
    engine.add(engine.make_requests(request_id, ids, params))
    outs = []
    with torch.inference_mode():
        while engine.has_unfinished:
            outs.extend(engine.step())
    return summary(outs)


async def run_async(engine: AsyncEngine, request_id: str, ids: list[int],
                    params: SamplingParams) -> dict[str, Any]:
    return summary([o async for o in engine.generate(request_id, ids, params)])


def summary(outs) -> dict[str, Any]:
    final = outs[-1]
    assert final.finished and all(not o.finished for o in outs[:-1])
    return {"text": "".join(o.text for o in outs),
            "tokens": [t for o in outs for t in o.token_ids],
            "logprobs": [(p.chosen.token, round(p.chosen.logprob, 5),
                          [(t.token, round(t.logprob, 5)) for t in p.top])
                         for o in outs for p in o.logprobs],
            "finish": final.finish_reason, "stop_reason": final.stop_reason,
            "usage": final.usage}


def a_stop_string(text: str, at: int) -> str:
    """Two characters of ``text`` from ``at`` on, that do not occur before ``at``."""
    for start in range(at, len(text) - 2):
        stop = text[start:start + 2]
        if stop.strip() and text.find(stop) == start:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


def params(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True, **kw})


async def test_outputs_are_made_off_the_engine_thread(engine, monkeypatch):
    threads: set[str] = set()
    add, token_text = detokenizer.IncrementalDetokenizer.add, Tokenizer.token_text

    def spy_add(self, token_id):
        threads.add(threading.current_thread().name)
        return add(self, token_id)

    def spy_text(self, token_id):
        threads.add(threading.current_thread().name)
        return token_text(self, token_id)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add", spy_add)
    monkeypatch.setattr(Tokenizer, "token_text", spy_text)
    got = await run_async(engine, "r", PROMPTS["a"],
                          params(stop=("zz",), logprobs=True, top_logprobs=5, max_tokens=12))
    assert got["usage"].completion_tokens == 12 and len(got["logprobs"]) == 12
    assert threads == {threading.current_thread().name}, threads  # the event loop's


@pytest.mark.parametrize("name", sorted(PROMPTS))
async def test_a_stop_string_gives_what_the_synchronous_engine_gives(engine, sync_engine, name):
    slow_steps(engine, 0.01)
    ids = PROMPTS[name]
    full = run_sync(sync_engine, f"full-{name}", ids, params())
    stop = a_stop_string(full["text"], at=len(full["text"]) // 3)
    kw = {"stop": (stop, "never-written"), "logprobs": True, "top_logprobs": 3}
    want = run_sync(sync_engine, f"sync-{name}", ids, params(**kw))
    assert want["text"] == full["text"][:full["text"].index(stop)]
    assert want["finish"] is FinishReason.STOP and want["stop_reason"] == stop
    assert want["usage"].completion_tokens < full["usage"].completion_tokens
    steps = engine.engine.stats.steps
    got = await run_async(engine, name, ids, params(**kw))
    assert got == want
    assert len(got["tokens"]) == len(got["logprobs"]) == got["usage"].completion_tokens
    # The engine stopped the sequence and gave its blocks back, its id is free again.
    for _ in range(200):
        if engine.load().running == 0:
            break
        await asyncio.sleep(0.01)
    assert_no_leaked_blocks(engine)
    assert engine.engine.stats.steps - steps <= got["usage"].completion_tokens + 2
    assert (await run_async(engine, name, ids, params(**kw))) == want


async def test_a_reader_that_stops_reading_is_stopped_by_its_stop_string(engine, sync_engine):
    slow_steps(engine, 0.02)
    ids = PROMPTS["b"]
    full = run_sync(sync_engine, "full-stall", ids, params(max_tokens=200))
    stop = a_stop_string(full["text"], at=len(full["text"]) // 8)
    stream = engine.generate("stalled", ids, params(max_tokens=200, stop=(stop,)))
    first = await anext(stream)  # then no more reading: the outputs pile up in its queue
    assert not first.finished
    started = time.monotonic()
    while engine.load().running:
        # 200 tokens at 20 ms a step: 4 s if the stop string were found only when read.
        assert time.monotonic() - started < 2.0, "the stalled sequence ran on"
        await asyncio.sleep(0.01)
    rest = [first] + [o async for o in stream]
    assert "".join(o.text for o in rest) == full["text"][:full["text"].index(stop)]
    assert rest[-1].finish_reason is FinishReason.STOP and rest[-1].stop_reason == stop
    assert_no_leaked_blocks(engine)


def test_a_finished_sequence_is_freed_without_the_garbage_collector(sync_engine):
    # Whatever ends a sequence (its length, a stop string, an abort, n > 1 siblings), its
    # Request and output state go as soon as nothing holds them: no reference cycle keeps
    # them, with their token lists and detokenizer, until the collector's next full pass.
    full = run_sync(sync_engine, "freed-full", PROMPTS["c"], params(max_tokens=12))
    stop = a_stop_string(full["text"], at=len(full["text"]) // 3)
    cases = [("length", params(max_tokens=6), None), ("stop", params(stop=(stop,)), None),
             ("n", params(max_tokens=4, n=3), None), ("abort", params(max_tokens=50), 2)]
    gc.collect()
    gc.disable()
    try:
        for name, sampling, abort_after in cases:
            requests = sync_engine.make_requests(f"freed-{name}", PROMPTS["c"], sampling)
            freed = [weakref.ref(r) for r in requests]
            sync_engine.add(requests)
            del requests
            with torch.inference_mode():
                for step in itertools.count():
                    if not sync_engine.has_unfinished:
                        break
                    if step == abort_after:
                        sync_engine.abort([f"freed-{name}"])
                    sync_engine.step()
            assert [r() for r in freed] == [None] * len(freed), name
    finally:
        gc.enable()
