"""Grammar specs -> llguidance matchers on SmolLM2's tokenizer, without the model: what each
grammar admits and rejects, how it ends, how bad specs fail, and the mask on the logits."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from core.errors import InvalidRequest
from core.grammar import (
    MAX_PARALLEL_CALLS,
    build_grammar,
    cache_key,
    check_grammar,
    close_objects,
)
from core.model_files import resolve_model_path
from core.pb.electron.v1 import worker_pb2 as pb
from core.tokenizer import Tokenizer
from router.openai.schemas import parse_chat_request
from router.tools.grammar_spec import grammar_spec, tool_use
from tests.support.sampling import make_request
from tests.support.schemas import (
    COMPILE_REFUSED,
    SCHEMAS,
    TOOLS,
    grammar_tool,
    json_object_spec,
    obj,
    schema_spec,
    tool_spec,
)
from workers.engine.grammar import (
    CLOSE_MARGIN,
    GrammarCompiler,
    _bias_by_shifts,
    _bias_by_table,
    apply_bitmasks,
    apply_bitmasks_at_once,
)
from workers.engine.request import Request
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def compiler(tok):
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids, overlap=False)
    yield comp
    comp.close()


def admits(compiler, tok, spec: pb.GrammarSpec, text: str) -> bool:
    """Whether the grammar takes ``text`` (as SmolLM2 tokenizes it) and then allows EOS."""
    m = compiler.matcher(spec)
    for token in tok.encode(text):
        if not bool(m.allowed()[token]):
            return False
        m.accept(token)
    return bool(m.allowed()[tok.eos_token_ids[0]])


WEATHER = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
TIME = '<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'


def test_json_schema_admits_a_valid_document_and_rejects_wrong_types(compiler, tok):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}}, "required": ["n"]}
    spec = schema_spec(schema)
    assert admits(compiler, tok, spec, '{"n": 7}')
    assert not admits(compiler, tok, spec, '{"n": 12}')
    assert not admits(compiler, tok, spec, '{"n": "7"}')
    assert not admits(compiler, tok, spec, '{"n": 7, "extra": 1}')  # strict closes objects
    assert not admits(compiler, tok, spec, '{"n": 7')               # EOS only when complete


def test_json_whitespace_is_fixed_so_a_model_cannot_loop_on_it(compiler, tok):
    spec = json_object_spec()
    assert admits(compiler, tok, spec, '{"a": [1, 2]}')
    assert not admits(compiler, tok, spec, '{"a":  [1, 2]}')
    assert not admits(compiler, tok, spec, '{\n"a": 1}')
    assert not admits(compiler, tok, spec, '[1, 2]')


def test_a_complete_document_allows_only_eos(compiler, tok):
    m = compiler.matcher(json_object_spec())
    for token in tok.encode('{"a": 1}'):
        m.accept(token)
    assert m.is_stopped
    assert set(m.allowed().nonzero().flatten().tolist()) <= set(tok.eos_token_ids)


def test_every_test_schema_compiles_and_is_itself_a_valid_schema(compiler):
    assert len(SCHEMAS) >= 40
    for _name, _what, schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        compiler.matcher(schema_spec(schema))


def test_required_tool_call_admits_calls_only(compiler, tok):
    spec = tool_spec()
    assert admits(compiler, tok, spec, WEATHER)
    assert not admits(compiler, tok, spec, "Sure. " + WEATHER)        # no filler asked
    assert not admits(compiler, tok, spec, WEATHER + TIME)            # not parallel
    assert not admits(compiler, tok, spec, WEATHER.replace("celsius", "kelvin"))
    assert not admits(compiler, tok, spec, WEATHER.replace("get_weather", "get_news"))
    assert not admits(compiler, tok, spec, "The weather is fine.")


def test_named_tool_call_admits_only_that_tool(compiler, tok):
    spec = tool_spec(mode="named", name="get_time")
    assert admits(compiler, tok, spec, TIME)
    assert not admits(compiler, tok, spec, WEATHER)


def test_filler_sentence_may_precede_the_calls_but_holds_no_angle_bracket(compiler, tok):
    spec = tool_spec(filler=True)
    assert admits(compiler, tok, spec, "Let me check that for you.\n" + WEATHER)
    assert admits(compiler, tok, spec, WEATHER)
    assert not admits(compiler, tok, spec, "Let me <b>check</b>. " + WEATHER)
    assert not admits(compiler, tok, spec, "word " * 60 + WEATHER)   # too long a filler


def test_parallel_calls_are_bounded(compiler, tok):
    spec = tool_spec(parallel=True)
    assert admits(compiler, tok, spec, WEATHER + "\n" + TIME)
    assert admits(compiler, tok, spec, "\n".join([TIME] * MAX_PARALLEL_CALLS))
    assert not admits(compiler, tok, spec, "\n".join([TIME] * (MAX_PARALLEL_CALLS + 1)))


def test_auto_mode_is_free_text_until_a_call_opens(compiler, tok):
    spec = tool_spec(mode="auto")
    assert admits(compiler, tok, spec, "It is 4, since a < b and b > a.")
    assert admits(compiler, tok, spec, "Checking. " + WEATHER)
    assert not admits(compiler, tok, spec, 'Checking. <tool_call>{"name": "get_news", '
                                           '"arguments": {}}</tool_call>')


def test_compiled_grammars_are_cached_per_spec_least_recently_used_out(tok):
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids, cache_size=2, overlap=False)
    specs = [schema_spec({"enum": [f"v{i}"]}, strict=False) for i in range(3)]
    a, b = comp.matcher(specs[0]), comp.matcher(specs[0])
    a.accept(a.allowed().nonzero()[0].item())  # each matcher has its own state
    assert not torch.equal(a.allowed(), b.allowed())
    comp.matcher(specs[1])
    comp.matcher(specs[0])          # a hit: now the most recently used
    comp.matcher(specs[2])          # evicts specs[1]
    assert list(comp._cache) == [cache_key(specs[0]), cache_key(specs[2])]
    # Equal specs share an entry, whichever message object carries them.
    comp.matcher(schema_spec({"enum": ["v0"]}, strict=False))
    assert len(comp._cache) == 2 and list(comp._cache)[-1] == cache_key(specs[0])


def tools_spec(*tools: pb.GrammarSpec.Tool, mode=pb.GrammarSpec.TOOL_MODE_REQUIRED,
               name="") -> pb.GrammarSpec:
    return pb.GrammarSpec(tool_calls=pb.GrammarSpec.ToolCalls(tools=tools, mode=mode, name=name))


@pytest.mark.parametrize("spec, param", [
    (schema_spec("not json"), "response_format"),
    (schema_spec("[1, 2]"), "response_format"),
    (pb.GrammarSpec(), "response_format"),  # no kind set
    (schema_spec({"type": "frobnicate"}), "response_format"),
    (schema_spec({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}), "response_format"),
    (schema_spec({"type": "string", "pattern": "(unclosed"}), "response_format"),
    (schema_spec({"type": "integer", "minimum": 5, "maximum": 1}), "response_format"),
    (pb.GrammarSpec(json_schema=pb.GrammarSpec.JsonSchema()), "response_format"),  # no schema
    (tools_spec(), "tools"),
    (tools_spec(grammar_tool("a"), grammar_tool("a")), "tools"),
    (tools_spec(grammar_tool("")), "tools"),
    (tools_spec(pb.GrammarSpec.Tool(name="a", parameters_json="{not json")), "tools"),
    (tools_spec(grammar_tool("a", [1])), "tools"),
    (tools_spec(grammar_tool("a"), mode=pb.GrammarSpec.TOOL_MODE_NAMED, name="b"), "tool_choice"),
    (tools_spec(grammar_tool("a"), mode=7), "tool_choice"),
    (tools_spec(grammar_tool("a", {"type": "nope"})), "tools"),
])
def test_bad_specs_are_invalid_requests_naming_the_field(compiler, spec, param):
    with pytest.raises(InvalidRequest) as err:
        compiler.matcher(spec)
    assert err.value.param == param
    with pytest.raises(InvalidRequest) as checked:  # the router's check says the same
        check_grammar(spec)
    assert (checked.value.param, checked.value.message) == (param, err.value.message)


def _refusal(check, spec: pb.GrammarSpec) -> tuple[str, str | None] | None:
    """(message, param) of the InvalidRequest ``check(spec)`` raises, or None."""
    try:
        check(spec)
    except InvalidRequest as exc:
        return exc.message, exc.param
    return None


@pytest.mark.parametrize("spec", [
    *(schema_spec(schema, strict=strict) for _, _, schema in SCHEMAS for strict in (False, True)),
    *(schema_spec(schema, strict=strict) for schema, _ in COMPILE_REFUSED
      for strict in (False, True)),
    schema_spec({"type": "object", "properties": {"a": {}}, "required": ["b"]}, strict=True),
    *(tool_spec(mode, parallel=True, filler=True) for mode in ("auto", "required")),
    tool_spec("named", name="get_time"),
    *(tool_spec(tools=[{"type": "function", "function": {"name": "f", "parameters": obj(
        {"a": schema})}}]) for schema, _ in COMPILE_REFUSED),
    json_object_spec(),
])
def test_the_routers_check_and_the_worker_agree(compiler, spec):
    """One source of truth: the router's tokenizer-free check (core/grammar.py) refuses a
    spec exactly when the worker's compile against its tokenizer does, with the same error."""
    assert _refusal(check_grammar, spec) == _refusal(compiler.matcher, spec)


def test_close_objects_keeps_what_the_schema_admits_a_subset():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
              "allOf": [{"properties": {"b": {}}}], "not": {"properties": {"c": {}}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]
    assert "additionalProperties" not in closed["not"]
    assert build_grammar(schema_spec(schema, strict=False)).param == "response_format"


def test_sampler_masks_constrained_rows_only_and_grammar_beats_min_tokens(compiler, tok):
    vocab = tok.vocab_size
    sampler = Sampler(vocab, tuple(sorted(tok.eos_token_ids)))
    spec = schema_spec({"enum": ["yes"]}, strict=False)
    free = Request("free", "free", [5, 6], SamplingParams(temperature=0))
    # min_tokens keeps EOS out; once "yes" is written, the grammar allows nothing but EOS.
    done = Request("done", "done", [5, 6], SamplingParams(temperature=0, min_tokens=50))
    done.logits_mask = compiler.matcher(spec)
    for token in tok.encode('"yes"'):
        done.logits_mask.accept(token)
    logits = torch.randn(2, vocab)
    expected_free = int(logits[0].argmax())
    out = sampler(logits, [free, done])
    assert out.token_ids[0] == expected_free
    assert out.token_ids[1] in tok.eos_token_ids


def test_mask_fill_overlaps_on_a_helper_thread(tok):
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids, overlap=True)
    try:
        spec = schema_spec({"type": "object", "properties": {"v": {"type": "integer"}},
                            "required": ["v"]}, strict=False)
        m = comp.matcher(spec)
        text = ""
        for token in tok.encode('{"v": 42}'):
            assert bool(m.allowed()[token])
            m.accept(token)
            text += tok.decode([token])
        assert json.loads(text) == {"v": 42}
        assert m.is_stopped
    finally:
        comp.close()


@pytest.mark.parametrize("parameters", [None, {}])  # sent as "" and "{}"
def test_a_tool_without_parameters_takes_an_empty_object(compiler, tok, parameters):
    spec = tools_spec(grammar_tool("ping", parameters))
    assert admits(compiler, tok, spec, '<tool_call>{"name": "ping", "arguments": {}}</tool_call>')
    assert not admits(compiler, tok, spec,
                      '<tool_call>{"name": "ping", "arguments": 3}</tool_call>')


def test_the_routers_specs_compile_to_what_they_ask_for(compiler, tok):
    """The two ends of the spec: what router/tools/grammar_spec.py builds, the worker reads."""
    base = {"model": "electron", "messages": [{"role": "user", "content": "Hi"}]}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    req = parse_chat_request({**base, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": schema, "strict": True}}}, max_messages=10)
    spec = grammar_spec(req, tool_use(req))
    assert admits(compiler, tok, spec, '{"n": 7}')
    assert not admits(compiler, tok, spec, '{"n": 7, "m": 1}')
    assert not admits(compiler, tok, spec, '{"n": ' + "9" * 20 + "}")  # bounded by the router
    req = parse_chat_request({**base, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}, max_messages=10)
    spec = grammar_spec(req, tool_use(req))
    assert admits(compiler, tok, spec, TIME)
    assert not admits(compiler, tok, spec, WEATHER)


def test_a_mask_that_never_comes_fails_its_sequence_within_the_bound(tok):
    """The step waits for the helper thread's mask at most ``mask_timeout_s``: a fill that
    hangs fails that sequence (TimeoutError, which the sampler turns into a failed row)
    instead of holding the engine thread for ever."""
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids, mask_timeout_s=0.2)
    try:
        m = comp.matcher(json_object_spec())
        m._pending = Future()  # the helper thread is stuck filling this mask
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="not ready within 0.2 s"):
            m.apply(torch.zeros(tok.vocab_size))
        assert time.monotonic() - started < 2
        m._pending = Future()
        with pytest.raises(TimeoutError):
            _ = m.is_accepting
    finally:
        comp.close()


def test_the_routers_check_compiles_a_spec_once_and_keys_it_by_a_digest(monkeypatch):
    import core.grammar as grammar

    compiled = []
    real = grammar._verdict
    monkeypatch.setattr(grammar, "_verdict", lambda spec: compiled.append(spec) or real(spec))
    big = schema_spec({"type": "object", "properties": {"a": {
        "type": "string", "description": "x" * 200_000}}})
    bad = schema_spec({"type": "string", "pattern": "\\bword"})
    for _ in range(3):
        check_grammar(big)
        with pytest.raises(InvalidRequest):
            check_grammar(bad)
    assert len(compiled) == 2
    assert all(len(key) == 16 for key in grammar._verdicts)  # not the 200 kB spec


# -- masks of many rows at once ------------------------------------------------------------------

def test_the_bitmask_expands_alike_on_the_cpu_and_on_a_device():
    """The byte table (CPU) and the shifts (a GPU's path, run here on the CPU) give the same
    bias, negative words (bit 31 set) and a vocabulary that ends inside a word included."""
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(-2**31, 2**31 - 1, (5, 40), dtype=torch.int32, generator=gen)
    words[0] = -1  # every token
    words[1] = 0   # none
    for vocab in (1280, 1263):
        table = _bias_by_table(words, vocab)
        assert table.shape == (5, vocab)
        assert torch.equal(table, _bias_by_shifts(words, vocab))
        bits = [(int(words[r, t // 32]) >> (t % 32)) & 1 for r in (2, 4) for t in range(vocab)]
        assert (table[[2, 4]].flatten() == 0).tolist() == [bool(b) for b in bits]


def test_a_step_hands_its_plain_grammar_rows_over_together(compiler, tok, monkeypatch):
    """Rows whose mask is their grammar's alone go to the device in one batch; a row the
    budget closes (a forced token) is applied on its own; a row without a grammar is left
    alone; a row whose only allowed token another stage banned (min_tokens keeps EOS out of a
    complete document) takes the grammar's mask. The tokens are those of each row alone."""
    from workers.engine import sampler as sampler_module

    spec = schema_spec({"type": "object", "properties": {"s": {"type": "string"}},
                        "required": ["s"]})
    prefixes = ['{"s": "x"}', '{"', "", '{"s": "hello', '{"s": ']
    budget_row = 3

    def matchers():
        out = []
        for i, text in enumerate(prefixes):
            m = compiler.matcher(spec, 8 + CLOSE_MARGIN if i == budget_row else None)
            for token in tok.encode(text):
                m.apply(torch.zeros(tok.vocab_size))
                m.accept(token)
            out.append(m)
        return out

    batched = []
    real = sampler_module.apply_bitmasks
    monkeypatch.setattr(sampler_module, "apply_bitmasks",
                        lambda logits, rows, words: (batched.append(list(rows)),
                                                     real(logits, rows, words)))
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(len(prefixes) + 1, tok.vocab_size, generator=gen) * 3
    requests = [make_request(temperature=0.0, min_tokens=50 if i == 0 else 0)
                for i in range(len(prefixes) + 1)]  # the last one without a grammar
    for req, m in zip(requests, matchers()):
        req.logits_mask = m
    out = sampler_module.Sampler(tok.vocab_size, tok.eos_token_ids)(logits.clone(), requests)
    assert batched == [[0, 1, 2, 4]]  # one batch; row 3 closes within its budget
    assert not out.failed
    alone = []
    for i, m in enumerate(matchers()):
        row = logits[i].clone()
        m.apply(row)
        alone.append(int(row.argmax()))
    assert out.token_ids[:5] == alone
    assert out.token_ids[0] in tok.eos_token_ids  # the grammar won over min_tokens
    assert out.token_ids[3] == tok.encode('"}')[0]  # the budget's forced close
    assert out.token_ids[5] == int(logits[5].argmax())


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3]])
def test_masks_at_once_equal_masks_row_by_row(rows):
    """The GPU's way (``apply_bitmasks_at_once``, run here on the CPU) and the CPU's way give
    the same logits, a row left with nothing taking its grammar's mask, other rows untouched."""
    vocab = 1000
    gen = torch.Generator().manual_seed(9)
    words = [torch.randint(-2**31, 2**31 - 1, (32,), dtype=torch.int32, generator=gen)
             for _ in rows]
    logits = torch.randn(4, vocab, generator=gen)
    logits[rows[-1]] = float("-inf")  # everything banned by an earlier stage
    logits[rows[-1], 7] = 0.0         # but one token the grammar may not allow
    words[-1][0] &= ~(1 << 7)
    at_once, row_by_row = logits.clone(), logits.clone()
    apply_bitmasks_at_once(at_once, rows, words)
    apply_bitmasks(row_by_row, rows, words)
    assert torch.equal(at_once, row_by_row)
    for j, row in enumerate(rows):
        allowed = _bias_by_table(words[j].unsqueeze(0), vocab)[0] == 0
        if j == len(rows) - 1:  # the grammar wins: its tokens, equally likely
            assert torch.equal(at_once[row], torch.where(allowed, 0.0, float("-inf")))
        else:
            assert torch.equal(at_once[row], logits[row].masked_fill(~allowed, float("-inf")))
    for row in set(range(4)) - set(rows):
        assert torch.equal(at_once[row], logits[row])
