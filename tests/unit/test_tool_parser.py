"""Tool calls read back from generated text: whole, and streamed in any chunking."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer
from router.tools.parser import (
    CLOSE,
    ContentDelta,
    ToolCall,
    ToolCallParser,
    parse_all,
    stream_deltas,
)

NAMES = frozenset({"get_weather", "book_table"})
WEATHER = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
BOOKING = ('<tool_call>{"name": "book_table", "arguments": {"people": 2, "time": "19:30", '
           '"notes": "<window> seat"}}</tool_call>')


def streamed(chunks: list[str]) -> tuple[str, list[ToolCall], list[str]]:
    """Content, calls and the content deltas as a stream of these chunks sees them."""
    parser = ToolCallParser(NAMES)
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    deltas = [e.text for e in events if isinstance(e, ContentDelta)]
    return "".join(deltas), [e for e in events if isinstance(e, ToolCall)], deltas


def test_filler_sentence_then_two_calls():
    content, calls = parse_all(f"Let me check that for you. {WEATHER}\n{BOOKING}", NAMES)
    assert content == "Let me check that for you."
    assert [(c.index, c.name) for c in calls] == [(0, "get_weather"), (1, "book_table")]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert json.loads(calls[1].arguments)["notes"] == "<window> seat"


def test_calls_alone_leave_no_content():
    content, calls = parse_all(f"\n {WEATHER} \n", NAMES)
    assert content == "" and len(calls) == 1


def test_plain_answer_is_content():
    assert parse_all("It is sunny in Paris.", NAMES) == ("It is sunny in Paris.", [])


def test_call_ids_are_call_and_24_characters_and_distinct():
    _, calls = parse_all(WEATHER * 5, NAMES)
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 5
    assert calls[0].as_openai() == {"id": calls[0].id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("bad", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',   # bad JSON
    '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',       # undeclared
    '<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>',    # not an object
    '<tool_call>{"name": ["get_weather"], "arguments": {}}</tool_call>',       # odd name
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',           # cut short
])
def test_an_invalid_call_is_dropped_never_a_call_nor_content(bad):
    content, calls = parse_all(f"Sure. {bad} Done.", NAMES)
    assert calls == []
    assert content == ("Sure.  Done." if bad.endswith(CLOSE) else "Sure.")


def test_text_that_might_open_a_call_is_held_until_it_is_known():
    parser = ToolCallParser(NAMES)
    assert parser.feed("Checking <tool") == [ContentDelta("Checking")]
    assert parser.feed("s> now") == [ContentDelta(" <tools> now")]
    assert parser.feed(" <tool_c") == []
    events = parser.feed('all>{"name": "get_weather", "arguments": {}}</tool_call>')
    assert [type(e) for e in events] == [ToolCall]
    assert parser.finish() == []


def test_a_call_is_emitted_only_once_closed():
    parser = ToolCallParser(NAMES)
    for piece in ('<tool_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
                  "</tool_call"):
        assert parser.feed(piece) == []
    [call] = parser.feed(">")
    assert call.name == "get_weather" and parser.calls == 1


def test_stream_deltas_have_openai_tool_call_shape():
    _, calls = parse_all(WEATHER, NAMES)
    deltas = stream_deltas([ContentDelta("One"), ContentDelta(" moment."), calls[0]])
    assert deltas == [
        {"content": "One moment."},
        {"tool_calls": [{"index": 0, "id": calls[0].id, "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
    ]


# -- any chunking gives the whole text's result ----------------------------------------------

PIECES = st.sampled_from([
    "Let me check that for you.", " ", "\n", "Sure", "<", "<tool", "<tool_call", "tool_call>",
    "</tool_call>", "a < b", WEATHER, BOOKING, '<tool_call>{"name": "nope", "arguments": {}}'
    "</tool_call>", '<tool_call>{"broken', "}", "é✓",
])


@st.composite
def text_and_chunks(draw) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(PIECES, max_size=12)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=20))))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(text_and_chunks())
def test_any_chunking_streams_what_the_whole_text_parses_to(case):
    text, chunks = case
    content, calls = parse_all(text, NAMES)
    s_content, s_calls, deltas = streamed(chunks)
    assert s_content == content
    assert [(c.index, c.name, c.arguments) for c in s_calls] == \
        [(c.index, c.name, c.arguments) for c in calls]
    assert all(deltas)  # no empty content delta is ever sent
    assert "arguments" not in content  # no call, whole or half, is ever spoken


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


def test_smollm2_token_pieces_stream_the_filler_first_then_the_calls(tokenizer):
    # The text split at SmolLM2's own token boundaries, as the worker's deltas arrive.
    text = f"One moment, I'll look that up.{WEATHER}{BOOKING}"
    ids = tokenizer.encode(text)
    pieces, seen = [], ""
    for k in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:k])
        pieces.append(decoded[len(seen):])
        seen = decoded
    assert "".join(pieces) == text and len(pieces) > 30
    parser = ToolCallParser(NAMES)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["ToolCall", "ToolCall"] and set(kinds[:-2]) == {"ContentDelta"}
    assert "".join(e.text for e in events[:-2]) == "One moment, I'll look that up."
