"""Tool calls and structured output as a user meets them: the official openai SDK against the
real router (uvicorn) in front of a real worker (gRPC, AsyncEngine running SmolLM2-135M in
float32). The worker's grammar must carry these guarantees, not the model: SmolLM2 is small.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import jsonschema
import openai
import pytest
import pytest_asyncio
from pydantic import BaseModel, Field

from tests.integration.test_router_worker import (
    engine_idle,
    start_router,
    start_worker,
    stop_router,
    wait_until,
)
from tests.support.openai_schema import validate
from tests.support.schemas import SCHEMAS, prompt_for
from tests.support.smollm_engine import assert_no_leaked_blocks, smollm2_engine

# The first test to read `answers` waits for every generation, on a shared 2-core CPU.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(900)]

MODEL = "electron"
CONCURRENCY = 24  # requests in flight at once: the engine batches them
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
BOOKING = {"type": "function", "function": {
    "name": "book_table", "description": "Book a restaurant table.",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["restaurant", "people"],
                   "properties": {"restaurant": {"type": "string", "maxLength": 24},
                                  "people": {"type": "integer", "minimum": 1, "maximum": 12},
                                  "time": {"type": "string", "maxLength": 5}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time",
                                          "description": "The current time."}}
TOOLS = [WEATHER, BOOKING, CLOCK]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters") or
              {"type": "object", "properties": {}, "additionalProperties": False} for t in TOOLS}
VOICE_AGENT = ("You are a friendly voice assistant on the phone. Before calling a tool, always "
               "acknowledge the request with one short sentence so the caller is not left in "
               "silence.")
TOOL_PROMPTS = ["What's the weather like in Paris?", "Book a table for 4 at Luigi's at 19:30.",
                "What time is it?"]


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    # Room for CONCURRENCY prompts of a few hundred tokens and their answers.
    yield from smollm2_engine("w0", kv_cache_mb=512)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(engine) -> AsyncIterator[openai.AsyncOpenAI]:
    server, endpoint = await start_worker(engine, "w0")
    router = await start_router([endpoint])
    async with openai.AsyncOpenAI(base_url=f"{router.base}/v1", api_key="none",
                                  max_retries=0, timeout=600) as c:
        yield c
    await stop_router(router)
    await server.stop(None)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def streamed(client: openai.AsyncOpenAI, **fields: Any) -> tuple[list[dict], Any]:
    """Every chunk (checked against OpenAI's schema) and the SDK's own accumulation of them."""
    chunks: list[dict[str, Any]] = []
    async with client.chat.completions.stream(model=MODEL, **fields) as stream:
        async for event in stream:
            if event.type == "chunk":
                chunk = event.chunk.model_dump(exclude_unset=True)
                validate(chunk, "CreateChatCompletionStreamResponse")
                chunks.append(chunk)
        try:
            final = await stream.get_final_completion()
        except openai.LengthFinishReasonError as exc:  # the SDK will not parse a cut answer
            final = exc.completion
    return chunks, final.choices[0]


def assert_valid_calls(message: Any, names: set[str]) -> None:
    assert message.tool_calls, message
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


# -- structured output -----------------------------------------------------------------------------

_ADDRESS = {"type": "object", "additionalProperties": False, "required": ["street", "city"],
            "properties": {"street": {"type": "string", "maxLength": 30},
                           "city": {"type": "string", "maxLength": 20}}}
# Beyond tests/support/schemas.py (shared with the engine's tests): the rest of the subset the
# router accepts (core/json_schema_subset.py), as pydantic and other clients write it.
ROUTER_SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    ("defs_and_refs", "a person and their pets", {
        "$defs": {"Pet": {"type": "object", "additionalProperties": False,
                          "required": ["name", "kind"],
                          "properties": {"name": {"type": "string", "maxLength": 20},
                                         "kind": {"enum": ["cat", "dog", "fish"]}}}},
        "type": "object", "additionalProperties": False, "required": ["owner", "pets"],
        "properties": {"owner": {"type": "string", "maxLength": 20},
                       "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"},
                                "minItems": 1, "maxItems": 2}}}),
    ("all_of_one_with_description", "a shipping address", {
        "type": "object", "additionalProperties": False, "required": ["shipping"],
        "properties": {"shipping": {"allOf": [_ADDRESS], "description": "where to ship"}}}),
    ("formats", "a holiday with its date and an id", {
        "type": "object", "additionalProperties": False, "required": ["date", "id"],
        "properties": {"date": {"type": "string", "format": "date"},
                       "id": {"type": "string", "format": "uuid"}}}),
    ("pattern_const_exclusive", "a flight code and a probability", {
        "type": "object", "additionalProperties": False,
        "required": ["version", "code", "p"],
        "properties": {"version": {"const": 2},
                       "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                       "p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}}),
    ("top_level_array", "three players and their scores", {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "additionalProperties": False, "required": ["name", "score"],
                  "properties": {"name": {"type": "string", "maxLength": 12},
                                 "score": {"type": "integer", "minimum": 0, "maximum": 10}}}}),
    ("top_level_enum", "your favourite primary colour", {"enum": ["red", "green", "blue"]}),
]

def schema_request(name: str, what: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"messages": user(prompt_for(what)), "temperature": 0, "max_tokens": 400,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": name, "schema": schema, "strict": True}}}


class Ingredient(BaseModel):
    name: str = Field(max_length=16)
    grams: int = Field(ge=1, le=1000)


class Recipe(BaseModel):
    title: str = Field(max_length=30)
    vegetarian: bool
    difficulty: Literal["easy", "medium", "hard"]
    ingredients: list[Ingredient] = Field(min_length=1, max_length=3)


class GetWeather(BaseModel):
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


THREE_CITIES = user("Get the weather in Paris, in Rome and in Berlin.")
NAMED = {"type": "function", "function": {"name": "book_table"}}
EARLIER_CALL = {"id": "call_abc", "type": "function", "function": {
    "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def answers(client) -> dict[Any, Any]:
    """Every generation the tests below look at, sent at once so that the engine batches them
    (one after the other they take minutes on a small CPU). A request that failed holds its
    exception, which the test that reads it raises."""
    create, parse = client.chat.completions.create, client.chat.completions.parse

    async def schema_case(case, stream):
        if stream:
            _, choice = await streamed(client, **schema_request(*case))
        else:
            choice = (await create(model=MODEL, **schema_request(*case))).choices[0]
        return choice.finish_reason, choice.message.content

    def required(prompt, stream):
        fields = {"messages": user(prompt), "tools": TOOLS, "tool_choice": "required",
                  "parallel_tool_calls": False, "temperature": 0, "max_tokens": 120}
        return streamed(client, **fields) if stream else create(model=MODEL, **fields)

    # Each schema once, streamed and whole in turn: greedy decoding gives both the same text,
    # so twice each would test the engine twice and the router's two paths no better.
    work: dict[Any, Any] = {("schema", case[0]): schema_case(case, k % 2 == 1)
                            for k, case in enumerate(SCHEMAS + ROUTER_SCHEMAS)}
    work |= {("required", p, s): required(p, s) for p in TOOL_PROMPTS for s in (False, True)}
    work |= {("named", p): create(model=MODEL, messages=user(p), tools=TOOLS, tool_choice=NAMED,
                                  parallel_tool_calls=False, temperature=0, max_tokens=120)
             for p in TOOL_PROMPTS}
    work["parallel"] = streamed(client, messages=THREE_CITIES, tools=[WEATHER],
                                tool_choice="required", temperature=0, max_tokens=300)
    work["single"] = create(model=MODEL, messages=THREE_CITIES, tools=[WEATHER],
                            tool_choice="required", parallel_tool_calls=False, temperature=0,
                            max_tokens=300)
    work["filler"] = streamed(client, messages=[{"role": "system", "content": VOICE_AGENT},
                                                *user("What's the weather in Madrid?")],
                              tools=TOOLS, tool_choice="required", temperature=0,
                              max_tokens=250)
    work["json_object"] = create(model=MODEL, messages=user("Describe a cat as JSON."),
                                 temperature=0, max_tokens=300,
                                 response_format={"type": "json_object"})
    work["parse"] = parse(model=MODEL, messages=user("Give me a simple pancake recipe."),
                          temperature=0, max_tokens=400, response_format=Recipe)
    work["parse_stream"] = streamed(client, messages=user("A quick vegetarian recipe."),
                                    temperature=0, max_tokens=400, response_format=Recipe)
    work["strict_tool"] = parse(model=MODEL, messages=user("How warm is it in Lisbon?"),
                                temperature=0, max_tokens=200, tool_choice="required",
                                tools=[openai.pydantic_function_tool(GetWeather)])
    work["multi_turn"] = create(model=MODEL, tools=TOOLS, temperature=0, max_tokens=60, messages=[
        *user("What's the weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [EARLIER_CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "22 degrees, sunny"}])
    gate = asyncio.Semaphore(CONCURRENCY)

    async def run(call):
        async with gate:
            return await call

    results = await asyncio.gather(*(run(c) for c in work.values()), return_exceptions=True)
    return dict(zip(work, results))


def answer(answers: dict[Any, Any], key: Any) -> Any:
    result = answers[key]
    if isinstance(result, BaseException):
        raise result
    return result


# -- structured output -----------------------------------------------------------------------------

async def test_every_json_schema_response_parses_and_validates_whole_and_streamed(answers):
    cases = SCHEMAS + ROUTER_SCHEMAS
    failures = []
    for name, _, schema in cases:
        content = None
        try:
            finish, content = answer(answers, ("schema", name))
            assert finish == "stop", f"finished {finish}"
            jsonschema.validate(json.loads(content), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{name}: {exc!s:.200} in {content!r:.300}")
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)
    assert len(cases) >= 40


async def test_json_object_response_is_one_json_object(answers):
    r = answer(answers, "json_object")
    assert isinstance(json.loads(r.choices[0].message.content), dict)


async def test_sdk_parse_helper_with_a_pydantic_model(answers):
    recipe = answer(answers, "parse").choices[0].message.parsed
    assert isinstance(recipe, Recipe) and recipe.ingredients


async def test_sdk_stream_helper_with_a_pydantic_model(answers):
    _, choice = answer(answers, "parse_stream")
    assert isinstance(choice.message.parsed, Recipe)


# -- tool calls ----------------------------------------------------------------------------------

async def test_required_tool_choice_always_yields_calls_that_validate(answers):
    for prompt in TOOL_PROMPTS:
        whole = answer(answers, ("required", prompt, False)).choices[0]
        _, streamed_choice = answer(answers, ("required", prompt, True))
        for choice in (whole, streamed_choice):
            assert choice.finish_reason == "tool_calls"
            assert_valid_calls(choice.message, {"get_weather", "book_table", "get_time"})
            assert choice.message.content is None  # no acknowledgement was asked for


async def test_named_tool_choice_calls_that_tool(answers):
    for prompt in TOOL_PROMPTS:
        choice = answer(answers, ("named", prompt)).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message, {"book_table"})


async def test_parallel_calls_come_with_distinct_indexes(answers):
    chunks, choice = answer(answers, "parallel")
    assert_valid_calls(choice.message, {"get_weather"})
    heads = [d["tool_calls"][0] for c in chunks for d in [c["choices"][0]["delta"]]
             if c["choices"] and d.get("tool_calls") and "id" in d["tool_calls"][0]]
    assert [h["index"] for h in heads] == list(range(len(choice.message.tool_calls)))
    assert len({h["id"] for h in heads}) == len(heads)


async def test_single_call_when_parallel_calls_are_off(answers):
    assert len(answer(answers, "single").choices[0].message.tool_calls) == 1


async def test_filler_sentence_streams_before_the_call(answers):
    chunks, choice = answer(answers, "filler")
    kinds = [("content" if d.get("content") else "call" if d.get("tool_calls") else None)
             for c in chunks if c["choices"] for d in [c["choices"][0]["delta"]]]
    assert "content" in kinds and "call" in kinds
    assert max(k for k, kind in enumerate(kinds) if kind == "content") < kinds.index("call")
    assert choice.message.content and "<" not in choice.message.content
    assert_valid_calls(choice.message, {"get_weather", "book_table", "get_time"})
    assert choice.finish_reason == "tool_calls"


async def test_sdk_parses_strict_pydantic_function_tool_arguments(answers):
    call = answer(answers, "strict_tool").choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


async def test_multi_turn_with_a_tool_result_answers(answers):
    r = answer(answers, "multi_turn")
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    message = r.choices[0].message
    assert message.content or message.tool_calls
    if message.tool_calls:
        assert_valid_calls(message, {"get_weather", "book_table", "get_time"})


async def test_invalid_schema_is_a_400_the_sdk_raises_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=MODEL, messages=user("hi"), response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}})
    assert caught.value.body["param"] == "response_format.json_schema.schema"


async def test_no_kv_block_is_left_behind(answers, engine):
    await wait_until(lambda: engine_idle(engine), timeout=30)
    assert_no_leaked_blocks(engine)
