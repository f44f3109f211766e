"""Budget-aware closing in the engine, on the tiny random-weight Llama: random weights write
garbage, so only the closing rule makes the output end. Over generated schemas and budgets
(hypothesis), every reply is complete JSON valid against its schema with finish_reason
"stop"; a budget below the schema's shortest output is refused naming max_tokens; and a
reply that ends on its own is the same, byte for byte, without the rule."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import EngineConfig
from core.errors import InvalidRequest
from core.tokenizer import Tokenizer
from tests.support.schemas import schema_spec, tool_spec
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.engine import Engine
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import FinishReason
from workers.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")
    config = EngineConfig(model=str(model), dtype="float32", kv_cache_bytes=8 * 2**20,
                          max_model_len=512, max_num_seqs=8, max_num_batched_tokens=512)
    eng = Engine(ModelRunner(config), Tokenizer.from_model_path(model), config)
    yield eng
    eng.grammars.close()


def run(engine: Engine, request_id: str, params: SamplingParams) -> dict[int, tuple]:
    """Text and final output of each sequence."""
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "JSON, please."}])
    engine.add(engine.make_requests(request_id, ids, params))
    texts: dict[int, str] = {}
    finals = {}
    with torch.inference_mode():
        while engine.has_unfinished:
            for out in engine.step():
                texts[out.index] = texts.get(out.index, "") + out.text
                if out.finished:
                    finals[out.index] = out
    return {i: (texts.get(i, ""), finals[i]) for i in finals}


NAMES = st.sampled_from(["a", "id", "name", "value", "tags", "when", "kind", "x_y"])
LEAVES = st.one_of(
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": lo + hi},
              st.integers(0, 4), st.integers(0, 30)),
    st.just({"type": "string"}),
    st.sampled_from([{"type": "string", "pattern": p} for p in
                     ("^[a-z]{2,4}$", "^[A-Z][0-9]{3}$", "[0-9]+", "^(yes|no)-[0-9]$")]),
    st.sampled_from([{"type": "string", "format": f} for f in ("date", "email", "uuid")]),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 5000)),
    st.builds(lambda lo: {"type": "number", "exclusiveMinimum": lo, "maximum": lo + 1},
              st.integers(-50, 50)),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.text("abcxyz", min_size=1, max_size=6),
                                                min_size=1, max_size=4, unique=True)),
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"type": ["string", "null"]},
                     {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                {"type": "string", "maxLength": 3}]}]),
)


def _object(props: dict, flags: list[bool]) -> dict:
    names = list(props)
    return {"type": "object", "properties": props,
            "required": [n for n, f in zip(names, flags) if f]}


SCHEMA = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo,
                                            "maxItems": lo + extra},
                  inner, st.integers(0, 3), st.integers(0, 3)),
        st.builds(_object, st.dictionaries(NAMES, inner, min_size=1, max_size=4),
                  st.lists(st.booleans(), min_size=4, max_size=4)),
    ),
    max_leaves=6,
).map(lambda s: s if s.get("type") == "object" else {
    "type": "object", "properties": {"v": s}, "required": ["v"]})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(schema=SCHEMA, extra=st.integers(0, 60), seed=st.integers(0, 2**31), n=st.integers(1, 2))
def test_generated_schemas_and_budgets_always_give_valid_json(engine, schema, extra, seed, n):
    spec = schema_spec(schema)
    minimum = engine.grammars.minimum_tokens(spec)
    assert minimum is not None, schema
    params = SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=minimum + extra,
                            grammar=spec)
    for text, final in run(engine, f"h{seed}", params).values():
        assert final.finish_reason is FinishReason.STOP, (schema, text)
        jsonschema.validate(json.loads(text), schema)
        assert final.usage.completion_tokens <= minimum + extra
    assert engine.kv.num_used_blocks == 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["required", "named", "parallel", "auto"]),
       extra=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_tool_calls_are_never_cut(engine, mode, extra, seed):
    spec = (tool_spec("named", "book_table") if mode == "named" else
            tool_spec("required", parallel=True) if mode == "parallel" else tool_spec(mode))
    minimum = engine.grammars.minimum_tokens(spec)
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max(1, minimum + extra),
                            grammar=spec)
    (text, final), = run(engine, f"t{seed}", params).values()
    assert text.count("<tool_call>") == text.count("</tool_call>"), text
    if mode != "auto":
        assert final.finish_reason is FinishReason.STOP and "</tool_call>" in text, text


@pytest.mark.parametrize("spec", [
    schema_spec({"type": "object", "properties": {"a": {"type": "string", "minLength": 30}},
                 "required": ["a"]}),
    tool_spec("required"),
])
def test_a_budget_below_the_shortest_output_is_refused_naming_max_tokens(engine, spec):
    minimum = engine.grammars.minimum_tokens(spec)
    with pytest.raises(InvalidRequest) as info:
        engine.make_requests("low", [1, 2, 3], SamplingParams(max_tokens=minimum - 1,
                                                              grammar=spec))
    assert info.value.param == "max_tokens"
    assert f"at least {minimum}" in info.value.message
    engine.make_requests("ok", [1, 2, 3], SamplingParams(max_tokens=minimum, grammar=spec))


def test_replies_that_end_on_their_own_are_unchanged(engine):
    """Same seed, with and without the rule: a reply the budget did not close is the same
    text; one it closed is reported (forced_close, counted in the engine's stats)."""
    spec = schema_spec({"type": "object", "properties": {
        "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 10},
        "tag": {"enum": ["a", "b"]}}, "required": ["ok", "note", "tag"]})
    minimum = engine.grammars.minimum_tokens(spec)
    real = engine.grammars.matcher
    natural = forced = 0
    before = engine.stats.structured_forced_closes
    for seed in range(12):  # budgets from the minimum (forced) to ample (natural)
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=minimum + 4 * seed,
                                grammar=spec)
        (text, final), = run(engine, f"s{seed}", params).values()
        if final.forced_close:
            forced += 1
            continue
        engine.grammars.matcher = lambda s, max_tokens=None: real(s, None)
        try:
            (plain, _), = run(engine, f"p{seed}", params).values()
        finally:
            engine.grammars.matcher = real
        assert plain == text
        natural += 1
    assert natural and forced  # both kinds were seen
    assert engine.stats.structured_forced_closes - before == forced
