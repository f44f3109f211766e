"""The shortest completion of constrained output (workers/engine/json_close.py), and the
budget rule that forces it (workers/engine/grammar.py), without a model: random logits
through the grammar mask stand in for a model that writes garbage, and the output must still
be complete and valid whatever the budget."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.grammar import close_objects
from tests.support.schemas import (
    SCHEMAS,
    TOOLS,
    json_object_spec,
    schema_spec,
    tool_spec,
)
from tests.unit.test_grammar import compiler, tok  # noqa: F401 - the shared fixtures
from workers.engine.grammar import CLOSE_MARGIN
from workers.engine.json_close import (
    Closer,
    Schemas,
    finish_number,
    shortest_regex_completion,
)

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def completion(schema, text: str) -> str:
    state = Closer("json", close_objects(schema)).state()
    state.feed(text)
    return state.completion()


# -- the shortest values and completions --------------------------------------------------------

def test_shortest_values_respect_every_keyword():
    s = Schemas(None)
    assert s.shortest({"type": "object", "properties": {"b": {"type": "integer"},
                                                        "a": {"type": "string"}},
                       "required": ["a", "b"]}) == '{"b": 0, "a": ""}'  # declared order
    assert s.shortest({"type": "integer", "minimum": 1234}) == "1234"
    assert 0.5 < float(s.shortest({"type": "number", "exclusiveMinimum": 0.5,
                                   "maximum": 0.75})) <= 0.75
    assert s.shortest({"enum": ["gamma", "be", "alpha"]}) == '"be"'
    assert s.shortest({"type": "string", "minLength": 3}) == '"aaa"'
    assert s.shortest({"type": "array", "minItems": 2, "items": {"const": 7}}) == "[7, 7]"
    assert s.shortest({"type": ["string", "null"]}) == '""'
    assert s.shortest({"anyOf": [{"type": "object", "properties": {"x": {"type": "boolean"}},
                                  "required": ["x"]}, {"type": "null"}]}) == "null"
    assert s.shortest({"type": "string", "format": "date"}) == '"2000-01-01"'


def test_regex_completion_follows_the_pattern_from_where_the_text_is():
    assert shortest_regex_completion("^[A-Z]{3}-[0-9]{2}$", "") == "AAA-00"
    assert shortest_regex_completion("^[A-Z]{3}-[0-9]{2}$", "QX") == "A-00"
    assert shortest_regex_completion("[0-9]+", "abc") == "0"      # unanchored: a search
    assert shortest_regex_completion("^(ab|c)d$", "a") == "bd"


def test_numbers_end_within_their_bounds():
    assert finish_number("1", {"minimum": 10}, True) == "0"       # 1 -> 10
    assert finish_number("-", {}, False) == "0"
    assert finish_number("1.", {}, False) == "0"
    assert finish_number("12e", {}, False) == "0"
    assert finish_number("-89E3482256348679002937", {}, False) == ""  # past float's range


@pytest.mark.parametrize("text, rest", [
    ('{"name": "Jo', '", "age": 0}'),
    ('{"name": "Jo", "a', 'ge": 0}'),
    ('{"name": "Jo", "age": 4', "}"),
    ('{"name": "Jo", "age": 4, ', '"tags": []}'),
    ('{"name": "Jo", "age": 4, "tags": ["x", ', '""]}'),
    ('{"name": "Jo\\', 'n", "age": 0}'),
])
def test_completion_closes_what_is_open_and_writes_required_keys(text, rest):
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age"]}
    assert completion(schema, text) == rest


def test_tool_call_completion_finishes_the_call_and_its_tag():
    params = {t["function"]["name"]: close_objects(t["function"]["parameters"]) for t in TOOLS}
    from workers.engine.json_close import tool_call_schema

    closer = Closer("tools", tool_call_schema(params), mode="required")
    state = closer.state()
    assert state.completion() == closer.shortest
    state.feed('<tool_call>{"name": "get_w')
    assert state.completion() == ('eather", "arguments": {"city": "", "unit": "celsius"}}'
                                  '</tool_call>')
    state.feed('eather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool')
    assert state.completion() == "_call>"
    state.feed("_call>")
    assert state.completion() == ""
    state.feed("\n")  # a newline after a call commits to another one
    assert state.completion().startswith("<tool_call>")


# -- the rule, through the mask, with random logits ---------------------------------------------

def sample(compiler, tok, spec, max_tokens: int, seed: int, scale: float = 3.0):
    """Random logits through the mask (a model that writes garbage): the text, whether it
    finished complete, and the matcher."""
    m = compiler.matcher(spec, max_tokens)
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_tokens):
        logits = torch.randn(tok.vocab_size, generator=g) * scale
        m.apply(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        m.accept(token)
        if token in tok.eos_token_ids:
            return tok.decode(ids), True, m
        ids.append(token)
    return tok.decode(ids), m.is_accepting, m


def check_calls(text: str, params: dict, mode: str) -> None:
    assert text.count("<tool_call>") == len(CALL.findall(text)), f"a call is cut: {text!r}"
    bodies = CALL.findall(text)
    assert bodies or mode == "auto"
    for body in bodies:
        call = json.loads(body)
        jsonschema.validate(call["arguments"], params[call["name"]])


CASES = ([(name, schema_spec(schema), schema) for name, _, schema in SCHEMAS]
         + [("json_object", json_object_spec(), {"type": "object"})])
TOOL_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_CASES = [("required", tool_spec("required")), ("named", tool_spec("named", "book_table")),
              ("parallel", tool_spec("required", parallel=True)),
              ("filler", tool_spec("required", filler=True)), ("auto", tool_spec("auto"))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), extra=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_any_schema_and_budget_gives_valid_complete_json(compiler, tok, case, extra, seed):
    _, spec, schema = case
    minimum = compiler.minimum_tokens(spec)
    assert minimum is not None
    text, complete, _ = sample(compiler, tok, spec, minimum + extra, seed)
    assert complete, text
    jsonschema.validate(json.loads(text), schema)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(TOOL_CASES), extra=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_any_tool_set_and_budget_gives_whole_calls(compiler, tok, case, extra, seed):
    mode, spec = case
    minimum = compiler.minimum_tokens(spec)
    assert minimum == (0 if mode == "auto" else minimum) and minimum is not None
    text, complete, _ = sample(compiler, tok, spec, max(1, minimum + extra), seed)
    if mode != "auto":
        assert complete, text
    check_calls(text, TOOL_PARAMS, "auto" if mode == "auto" else "required")


def test_the_minimum_is_the_shortest_output_in_tokens(compiler, tok):
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2}},
              "required": ["a"]}
    assert compiler.minimum_tokens(schema_spec(schema)) == len(tok.encode('{"a": "aa"}'))
    assert compiler.minimum_tokens(tool_spec("auto")) == 0


def assert_same_masks(tok, m1, m2, text: str) -> None:
    """Both matchers mask every step of ``text`` alike."""
    for token in tok.encode(text):
        a, b = torch.zeros(tok.vocab_size), torch.zeros(tok.vocab_size)
        m1.apply(a)
        m2.apply(b)
        assert torch.equal(a, b)
        m1.accept(token)
        m2.accept(token)


def test_far_from_the_end_the_rule_does_nothing(compiler, tok):
    """With room to spare the masked logits are exactly the grammar's (no forced token) and
    the rule does not even look at the text (the first check is far ahead)."""
    spec = schema_spec({"type": "object", "properties": {"s": {"type": "string"}},
                        "required": ["s"]})
    with_budget = compiler.matcher(spec, 4000)
    assert_same_masks(tok, with_budget, compiler.matcher(spec, None), '{"s": "hello')
    budget = with_budget._budget
    assert budget.check_at < 4000 - 100 and budget.unread  # nothing scanned yet


def test_close_to_the_end_only_the_completion_is_allowed(compiler, tok):
    spec = schema_spec({"type": "object", "properties": {"s": {"type": "string"}},
                        "required": ["s"]})
    m = compiler.matcher(spec, 8 + CLOSE_MARGIN)
    ids = tok.encode('{"s": "hello')
    for token in ids:
        m.apply(torch.zeros(tok.vocab_size))
        m.accept(token)
    logits = torch.zeros(tok.vocab_size)
    m.apply(logits)
    allowed = (logits == 0).nonzero().flatten().tolist()
    assert allowed == tok.encode('"}')[:1]
    assert m.forced_close


def test_a_failing_closer_leaves_the_plain_mask(compiler, tok, monkeypatch):
    """A bug in the closer must not fail the engine's step: that sequence goes on with the
    grammar's mask alone."""
    from workers.engine.json_close import CloseState

    def broken(self):
        raise RuntimeError("bug")

    monkeypatch.setattr(CloseState, "completion_chunks", broken)
    spec = schema_spec({"type": "object", "properties": {"s": {"type": "string"}},
                        "required": ["s"]})
    m = compiler.matcher(spec, 3)
    assert_same_masks(tok, m, compiler.matcher(spec, None), '{"s": "a')
    assert m._budget is None
