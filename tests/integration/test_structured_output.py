"""Constrained decoding in the engine end to end: SmolLM2-135M (float32) must produce valid
JSON for every test schema and valid tool calls, because the grammar, not luck, carries it.
Also: bad grammars fail cleanly, and n > 1, logprobs, stop strings and preemption behave."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from core.config import EngineConfig
from core.errors import InvalidRequest
from core.grammar import MAX_PARALLEL_CALLS
from core.pb.electron.v1 import worker_pb2 as pb
from core.tokenizer import Tokenizer
from tests.support.schemas import (
    SCHEMAS,
    TOOLS,
    json_object_spec,
    prompt_for,
    schema_spec,
    tool_spec,
)
from tests.support.smollm_engine import (
    assert_no_leaked_blocks,
    chat_ids,
    smollm2_engine,
)
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.engine import Engine
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import FinishReason
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
TOOL_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def engine():
    yield from smollm2_engine("structured")


async def generate(engine, request_id, ids, params) -> dict[int, tuple[str, list]]:
    """Text and outputs per sequence index."""
    outs: dict[int, list] = {}
    async for o in engine.generate(request_id, ids, params):
        outs.setdefault(o.index, []).append(o)
    return {i: ("".join(o.text for o in seq), seq) for i, seq in outs.items()}


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(text before the first call, the calls); every call's arguments validated."""
    calls = [json.loads(body) for body in CALL.findall(text)]
    assert CALL.sub("", text).strip() == text.split("<tool_call>")[0].strip(), text
    for call in calls:
        assert set(call) == {"name", "arguments"}
        jsonschema.validate(call["arguments"], TOOL_PARAMS[call["name"]])
    return text.split("<tool_call>")[0], calls


SYSTEM_FILLER = ("You can call tools. Before calling a tool, first tell the user in one short "
                 "sentence that you are checking, e.g. 'Let me check that for you.'")
TOOL_CASES = {  # id -> (mode, tool name, question)
    "required-weather": ("required", None, "What's the weather in Paris?"),
    "required-no-fit": ("required", None, "Hello there!"),  # no tool fits; one is called anyway
    "named-book": ("named", "book_table", "Book a table for 4 at Luigi's at 19:30."),
    "named-joke": ("named", "get_time", "Tell me a joke."),
}


@pytest.fixture(scope="module")
async def results(engine):
    """Every SmolLM2 request of this module, run concurrently through one engine (one batch
    keeps the wall time small): request id -> {index: (text, outputs)}."""
    jobs = {}
    for i, (_name, what, schema) in enumerate(SCHEMAS):
        jobs[f"schema-{i}"] = (chat_ids(engine, prompt_for(what)), SamplingParams(
            temperature=0, max_tokens=160, grammar=schema_spec(schema)))
    jobs["object"] = (chat_ids(engine, "Give a JSON object with the name and age of a cat."),
                      SamplingParams(temperature=0, max_tokens=120,
                                     grammar=json_object_spec()))
    for rid, (mode, name, question) in TOOL_CASES.items():
        jobs[rid] = (chat_ids(engine, question), SamplingParams(
            temperature=0, max_tokens=100, grammar=tool_spec(mode, name)))
    jobs["parallel-filler"] = (
        chat_ids(engine, "What's the weather in Paris and the time in Tokyo?", SYSTEM_FILLER),
        SamplingParams(temperature=0, max_tokens=MAX_PARALLEL_CALLS * 40 + 40,
                       grammar=tool_spec(parallel=True, filler=True)))
    for rid, question in (("auto-text", "What is 2 + 2?"),
                          ("auto-call", "What's the weather in Paris? Use a tool.")):
        jobs[rid] = (chat_ids(engine, question),
                     SamplingParams(temperature=0, max_tokens=60, grammar=tool_spec("auto")))
    jobs["siblings"] = (chat_ids(engine, prompt_for("a person")), SamplingParams(
        n=3, temperature=1.0, seed=7, max_tokens=100, logprobs=True, top_logprobs=2,
        grammar=schema_spec(SCHEMAS[0][2])))
    jobs["stop"] = (chat_ids(engine, prompt_for("a person")), SamplingParams(
        temperature=0, max_tokens=60, stop=('", ',), grammar=schema_spec(SCHEMAS[0][2])))
    done = await asyncio.gather(*(generate(engine, rid, ids, params)
                                  for rid, (ids, params) in jobs.items()))
    assert_no_leaked_blocks(engine)
    return dict(zip(jobs, done))


def test_every_schema_gives_json_that_validates(results):
    assert len(SCHEMAS) >= 40
    for i, (name, _what, schema) in enumerate(SCHEMAS):
        text, outs = results[f"schema-{i}"][0]
        assert outs[-1].finish_reason is FinishReason.STOP, (name, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_gives_an_object(results):
    text, outs = results["object"][0]
    assert outs[-1].finish_reason is FinishReason.STOP, text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("case", list(TOOL_CASES))
def test_required_and_named_tool_choice_always_give_a_valid_call(results, case):
    text, outs = results[case][0]
    assert outs[-1].finish_reason is FinishReason.STOP, text
    before, calls = parse_calls(text)
    assert before == "" and len(calls) == 1
    name = TOOL_CASES[case][1]
    if name is not None:
        assert calls[0]["name"] == name


def test_parallel_calls_with_a_filler_sentence(results):
    text, outs = results["parallel-filler"][0]
    assert outs[-1].finish_reason is FinishReason.STOP, text
    before, calls = parse_calls(text)
    assert "<" not in before
    assert 1 <= len(calls) <= MAX_PARALLEL_CALLS


def test_auto_mode_answers_in_text_or_makes_a_valid_call(results):
    for rid in ("auto-text", "auto-call"):
        parse_calls(results[rid][0][0])


def test_sampled_siblings_with_logprobs_each_follow_the_grammar(results):
    seqs = results["siblings"]
    assert len(seqs) == 3
    for text, outs in seqs.values():
        assert outs[-1].finish_reason is FinishReason.STOP, text
        jsonschema.validate(json.loads(text), SCHEMAS[0][2])
        lps = [lp for o in outs for lp in o.logprobs]
        # Logprobs describe the masked distribution: the chosen token is always allowed.
        assert lps and all(lp.chosen.logprob > float("-inf") for lp in lps)


def test_stop_string_ends_constrained_text_early(results):
    text, outs = results["stop"][0]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == '", '
    assert text.startswith('{"name": "') and '", ' not in text


async def test_aborting_a_constrained_request_frees_its_blocks(engine):
    gen = engine.generate("abort-grammar", chat_ids(engine, prompt_for("a book")), SamplingParams(
        temperature=0, max_tokens=150, grammar=schema_spec(SCHEMAS[8][2])))
    async for _ in gen:
        break
    await gen.aclose()
    for _ in range(200):  # the abort reaches the engine thread through its inbox
        if engine.load().running == 0:
            break
        await asyncio.sleep(0.01)
    assert_no_leaked_blocks(engine)


@pytest.mark.parametrize("grammar, param", [
    (schema_spec({"type": "frobnicate"}), "response_format"),
    (tool_spec(tools=[]), "tools"),
    (schema_spec("{not json"), "response_format"),
    (pb.GrammarSpec(), "response_format"),
])
async def test_uncompilable_grammar_is_refused_and_nothing_leaks(engine, grammar, param):
    with pytest.raises(InvalidRequest) as err:
        await generate(engine, "bad-grammar", chat_ids(engine, "Hi"),
                       SamplingParams(max_tokens=4, grammar=grammar))
    assert err.value.param == param
    assert_no_leaked_blocks(engine)
    text, _ = (await generate(engine, "after-bad", chat_ids(engine, "Hi"),
                              SamplingParams(temperature=0, max_tokens=2)))[0]
    assert text


def test_preempted_constrained_requests_still_follow_the_grammar(tmp_path):
    """A random-weight model and a KV cache too small for the batch: requests are preempted
    and recomputed, and every output still validates (the grammar carries a random model)."""
    model = make_tiny_llama_dir(tmp_path / "tiny")
    # 8 KiB a block: 24 blocks hold 384 tokens; 8 requests of ~60-100 tokens need more.
    config = EngineConfig(model=str(model), dtype="float32", kv_cache_bytes=24 * 8192,
                          max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256)
    eng = Engine(ModelRunner(config), Tokenizer.from_model_path(model), config)
    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["a", "b", "c"]}, "word": {"type": "string", "maxLength": 30}},
        "required": ["ok", "n", "tag", "word"], "additionalProperties": False}
    ids = eng.tokenizer.encode_chat([{"role": "user", "content": "Give JSON please " * 3}])
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=120, grammar=schema_spec(schema))
    requests = [r for i in range(8) for r in eng.make_requests(f"p{i}", ids, params)]
    eng.add(requests)
    texts: dict[str, str] = {}
    finals = {}
    while eng.has_unfinished:
        with torch.inference_mode():  # as the engine thread runs its steps
            step = eng.step()
        for out in step:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                finals[out.request_id] = out
    assert sum(r.num_preemptions for r in requests) > 0
    for rid, out in finals.items():
        assert out.finish_reason is FinishReason.STOP, texts[rid]
        jsonschema.validate(json.loads(texts[rid]), schema)
    assert len(finals) == 8
    assert eng.kv.num_used_blocks == 0
    eng.scheduler.check_integrity()
