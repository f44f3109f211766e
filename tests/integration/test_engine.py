"""The engine end to end on the real SmolLM2-135M-Instruct: the AsyncEngine as the worker's
gRPC service uses it (no Ray, no network)."""

from __future__ import annotations

import asyncio
import math

import pytest

from core.errors import ContextLengthExceeded, InvalidRequest
from tests.support.smollm_engine import (
    assert_no_leaked_blocks,
    chat_ids,
    smollm2_engine,
)
from workers.engine.outputs import FinishReason
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    yield from smollm2_engine("test")


async def run(engine, request_id, ids, params, **kw):
    outs = [o async for o in engine.generate(request_id, ids, params, **kw)]
    by_index: dict[int, list] = {}
    for o in outs:
        by_index.setdefault(o.index, []).append(o)
    return by_index


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


async def test_capital_of_france_is_paris_greedy(engine):
    outs = await run(engine, "paris", chat_ids(engine, "What is the capital of France?"),
                     SamplingParams(temperature=0, max_tokens=32))
    final = outs[0][-1]
    assert "Paris" in text_of(outs[0])
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert final.usage.completion_tokens == sum(len(o.token_ids) for o in outs[0])
    assert_no_leaked_blocks(engine)


async def test_second_identical_request_reports_cached_tokens(engine):
    ids = chat_ids(engine, "Tell me one fact about the Moon.")
    first = await run(engine, "c1", ids, SamplingParams(temperature=0, max_tokens=4))
    second = await run(engine, "c2", ids, SamplingParams(temperature=0, max_tokens=4))
    usage1, usage2 = first[0][-1].usage, second[0][-1].usage
    assert usage2.cached_tokens == (len(ids) - 1) // 16 * 16 > 0
    assert usage1.cached_tokens < usage2.cached_tokens
    assert text_of(first[0]) == text_of(second[0])


async def test_different_cache_salt_shares_nothing(engine):
    ids = chat_ids(engine, "A salted question about the sea and its tides.")
    await run(engine, "s1", ids, SamplingParams(max_tokens=2), cache_salt="tenant-a")
    other = await run(engine, "s2", ids, SamplingParams(max_tokens=2), cache_salt="tenant-b")
    assert other[0][-1].usage.cached_tokens == 0


async def test_n_sequences_share_the_prompt_and_differ(engine):
    ids = chat_ids(engine, "Write a word.")
    outs = await run(engine, "n3", ids, SamplingParams(n=3, temperature=1.0, seed=1,
                                                       max_tokens=8))
    assert sorted(outs) == [0, 1, 2]
    assert all(outs[i][-1].finished for i in outs)
    # Siblings found the first sequence's prompt blocks in the cache.
    assert outs[1][-1].usage.cached_tokens == (len(ids) - 1) // 16 * 16
    assert_no_leaked_blocks(engine)


async def test_same_seed_same_tokens_whatever_the_batch(engine):
    ids = chat_ids(engine, "Say something about cats.")
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    alone = await run(engine, "seed-alone", ids, params)
    noise = [run(engine, f"noise-{i}", chat_ids(engine, f"Count to {i}."),
                 SamplingParams(temperature=1.0, max_tokens=12)) for i in range(5)]
    results = await asyncio.gather(run(engine, "seed-crowd", ids, params), *noise)
    crowd = results[0]
    tokens = lambda outs: [t for o in outs[0] for t in o.token_ids]  # noqa: E731
    assert tokens(alone) == tokens(crowd)


async def test_stop_string_excluded_from_output(engine):
    ids = chat_ids(engine, "What is the capital of France?")
    full = text_of((await run(engine, "full", ids, SamplingParams(temperature=0,
                                                                  max_tokens=32)))[0])
    stop = "Paris"
    assert stop in full
    outs = await run(engine, "stopped", ids, SamplingParams(temperature=0, max_tokens=32,
                                                            stop=(stop,)))
    assert text_of(outs[0]) == full[: full.index(stop)]
    assert outs[0][-1].finish_reason is FinishReason.STOP
    assert outs[0][-1].stop_reason == stop


async def test_logprobs_shape(engine):
    outs = await run(engine, "lp", chat_ids(engine, "Hi"),
                     SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3))
    positions = [lp for o in outs[0] for lp in o.logprobs]
    assert len(positions) == outs[0][-1].usage.completion_tokens
    for pos in positions:
        assert len(pos.top) == 3 and pos.chosen.logprob <= 0
        assert pos.top[0].logprob >= pos.top[1].logprob >= pos.top[2].logprob
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(pos.chosen.logprob, pos.top[0].logprob, abs_tol=1e-4)


async def test_multibyte_text_streams_without_broken_characters(engine):
    outs = await run(engine, "utf8", chat_ids(engine, "Translate to Hindi: good morning"),
                     SamplingParams(temperature=0.7, seed=3, max_tokens=40))
    deltas = [o.text for o in outs[0]]
    assert all("\ufffd" not in d for d in deltas)


async def test_abort_midway_frees_blocks(engine):
    ids = chat_ids(engine, "Write a long story about a dragon.")
    gen = engine.generate("abort-me", ids, SamplingParams(max_tokens=500, ignore_eos=True))
    async for _ in gen:
        break
    await gen.aclose()
    for _ in range(200):
        if engine.load().running == 0:
            break
        await asyncio.sleep(0.01)
    assert_no_leaked_blocks(engine)


@pytest.mark.parametrize("make, error, param", [
    (lambda e: ([], SamplingParams()), InvalidRequest, "token_ids"),
    (lambda e: ([e.vocab_size + 5], SamplingParams()), InvalidRequest, "token_ids"),
    (lambda e: ([1] * e.max_model_len, SamplingParams()), ContextLengthExceeded, "messages"),
    (lambda e: ([1, 2, 3], SamplingParams(max_tokens=e.max_model_len)), ContextLengthExceeded,
     "max_tokens"),
])
async def test_bad_input_is_refused_and_engine_keeps_serving(engine, make, error, param):
    ids, params = make(engine)
    with pytest.raises(error) as info:
        await run(engine, "bad", ids, params)
    assert info.value.param == param
    outs = await run(engine, "after-bad", chat_ids(engine, "Hi"), SamplingParams(max_tokens=2))
    assert outs[0][-1].finished
    assert_no_leaked_blocks(engine)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"temperature": float("nan")},
                                    {"top_p": 1.5}, {"max_tokens": 0}, {"presence_penalty": 3}])
def test_bad_sampling_parameters_are_typed_errors(kwargs):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == next(iter(kwargs))
