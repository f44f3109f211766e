"""Streamed chunks of tool-call and structured responses, built from real worker deltas
(``GenerateResponse`` messages carrying SmolLM2's token pieces): OpenAI's schema accepts every
chunk, and the official SDK's stream accumulation rebuilds the non-streamed message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from core.model_files import resolve_model_path
from core.pb.electron.v1 import worker_pb2 as pb
from core.tokenizer import Tokenizer
from router.chat.chunks import ChunkStream
from router.chat.response import assistant_message
from router.chat.service import Prepared
from router.chat.usage import Usage
from router.openai.schemas import parse_chat_request
from router.tools.grammar_spec import tool_use
from tests.support.openai_schema import validate

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
FILLER = "Let me check the weather for you."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


def prepared(**fields: Any) -> Prepared:
    req = parse_chat_request({"model": "electron", "stream": True,
                              "messages": [{"role": "user", "content": "Weather?"}], **fields},
                             max_messages=200)
    return Prepared(request=req, request_id="req_1", completion_id="chatcmpl-1", created=1,
                    model="electron", prompt_token_ids=[1, 2, 3], wire=pb.GenerateRequest(),
                    tools=tool_use(req))


def worker_deltas(tokenizer: Tokenizer, text: str, finish: str = "stop",
                  index: int = 0) -> list[pb.GenerateResponse]:
    """The text as a worker streams it: one message per token, the last with the finish."""
    ids = tokenizer.encode(text)
    out, seen = [], ""
    for k in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:k])
        out.append(pb.GenerateResponse(index=index, token_ids=[ids[k - 1]],
                                       text=decoded[len(seen):]))
        seen = decoded
    out[-1].finish_reason = finish
    out[-1].usage.CopyFrom(pb.Usage(prompt_tokens=3, completion_tokens=len(ids)))
    return out


def stream(p: Prepared, messages: list[pb.GenerateResponse]) -> list[dict[str, Any]]:
    usage = Usage()
    usage.start(len(p.prompt_token_ids), p.n)
    chunks = ChunkStream(p, usage, "fp_test")
    out = []
    for m in messages:  # counted as the generation counts them, then turned into chunks
        usage.observe(m)
        out += chunks.add(m)
    out += chunks.end()
    for chunk in out:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return out


def accumulate(chunks: list[dict[str, Any]], **state: Any):
    """The SDK's own reading of the stream (``client.chat.completions.stream``)."""
    acc = ChatCompletionStreamState(**state)
    for chunk in chunks:
        acc.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    if acc.current_completion_snapshot.choices[0].finish_reason == "length":
        return acc.current_completion_snapshot.choices[0]  # the SDK refuses to parse those
    return acc.get_final_completion().choices[0]


def test_filler_streams_before_the_calls_and_the_sdk_rebuilds_the_message(tokenizer):
    p = prepared(tools=[WEATHER], stream_options={"include_usage": True})
    text = f"{FILLER} {CALL % 'Paris'}\n{CALL % 'Oslo'}"
    chunks = stream(p, worker_deltas(tokenizer, text))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "Let"}
    kinds = [next(iter(set(d) - {"role"}), None) for d in deltas]
    last_content = max(i for i, k in enumerate(kinds) if k == "content")
    first_call = kinds.index("tool_calls")
    assert last_content < first_call  # the whole sentence before any call
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert all(len(d["tool_calls"]) == 1 for d in deltas if "tool_calls" in d)
    assert [c["index"] for c in calls] == [0, 0, 1, 1]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[0]["id"].startswith("call_") and "id" not in calls[1]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == \
        "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0

    choice = accumulate(chunks, input_tools=[WEATHER])
    whole = assistant_message(p.tools, text, "stop")
    assert choice.finish_reason == whole["finish_reason"] == "tool_calls"
    assert choice.message.content == whole["message"]["content"] == FILLER
    got = [(c.function.name, c.function.parsed_arguments) for c in choice.message.tool_calls]
    assert got == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert [json.loads(c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == \
        [{"city": "Paris"}, {"city": "Oslo"}]


def test_calls_without_filler_have_null_content(tokenizer):
    p = prepared(tools=[WEATHER], tool_choice="required")
    text = CALL % "Rome"
    choice = accumulate(stream(p, worker_deltas(tokenizer, text)), input_tools=[WEATHER])
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    whole = assistant_message(p.tools, text, "stop")
    assert whole["message"]["content"] is None
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "electron",
            "choices": [{"index": 0, **whole, "logprobs": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
    validate(body, "CreateChatCompletionResponse")


def test_a_call_cut_short_by_max_tokens_is_dropped_and_finishes_length(tokenizer):
    p = prepared(tools=[WEATHER])
    text = f"{FILLER} {CALL % 'Paris'}" + (CALL % "Oslo")[:40]
    chunks = stream(p, worker_deltas(tokenizer, text, finish="length"))
    choice = accumulate(chunks)
    assert choice.finish_reason == "length"
    assert choice.message.content == FILLER
    assert [c.function.arguments for c in choice.message.tool_calls] == ['{"city": "Paris"}']
    whole = assistant_message(p.tools, text, "length")
    assert whole["finish_reason"] == "length" and whole["message"]["content"] == FILLER
    assert len(whole["message"]["tool_calls"]) == 1


def test_auto_mode_plain_answer_streams_as_content(tokenizer):
    p = prepared(tools=[WEATHER])
    text = "It is sunny in Paris, about 18 degrees."
    choice = accumulate(stream(p, worker_deltas(tokenizer, text)))
    assert (choice.message.content, choice.finish_reason) == (text, "stop")
    assert not choice.message.tool_calls


def test_two_choices_parse_their_calls_separately(tokenizer):
    p = prepared(tools=[WEATHER], n=2)
    first = worker_deltas(tokenizer, CALL % "Paris", index=0)
    second = worker_deltas(tokenizer, "No tool needed.", index=1)
    interleaved = [m for pair in zip(first, second) for m in pair]
    interleaved += first[len(second):] + second[len(first):]
    chunks = stream(p, interleaved)
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert finishes == {0: "tool_calls", 1: "stop"}


def test_json_schema_stream_is_plain_content_the_sdk_parses(tokenizer):
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        celsius: int

    p = prepared(response_format={"type": "json_schema", "json_schema": {
        "name": "Weather", "strict": True, "schema": Weather.model_json_schema()}})
    text = '{"city": "Paris", "celsius": 18}'
    choice = accumulate(stream(p, worker_deltas(tokenizer, text)), response_format=Weather)
    assert choice.message.parsed == Weather(city="Paris", celsius=18)
