"""Request validation at the HTTP edge, driven through the real router app.

The app runs with no worker: a request that passes validation ends in 503 ``no_workers``,
one that does not is a 400 whose ``param`` names the field (never FastAPI's 422).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from core.config import RouterConfig, load_config
from core.endpoints import StaticWorkerSource
from core.errors import ContextLengthExceeded, InvalidRequest
from core.json_schema_subset import check_schema
from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer
from router.api.app import create_app
from router.chat.wire import check_buffered_size, completion_budget, to_generate_request
from router.openai.schemas import ChatCompletionRequest, parse_chat_request
from tests.support.openai_schema import validate
from tests.support.schemas import COMPILE_REFUSED
from tests.support.tenancy import local_tenancy

USER = {"role": "user", "content": "Hello there"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def app(tokenizer):
    config = load_config(env={}, overrides={"auth": {"enabled": False},
                                            "tenancy": local_tenancy()})
    return create_app(config, StaticWorkerSource([]), tokenizer=tokenizer)


@asynccontextmanager
async def client(app):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            yield c


async def post(app, body: Any) -> httpx.Response:
    async with client(app) as c:
        return await c.post("/v1/chat/completions", json=body)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "electron", "messages": [USER], **fields}


def assert_invalid(response: httpx.Response, param: str | None, *, status: int = 400,
                   code: str | None = None, says: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert says.lower() in error["message"].lower()
    return error


def assert_accepted(response: httpx.Response) -> None:
    """Validation passed: the request got as far as choosing a worker (there is none)."""
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "no_workers"


# -- the inputs the issue lists -------------------------------------------------------------------

async def test_missing_messages_is_400_naming_messages(app):
    response = await post(app, {"model": "electron"})
    assert_invalid(response, "messages", says="Missing required parameter: 'messages'")


async def test_empty_messages_is_400(app):
    assert_invalid(await post(app, chat(messages=[])), "messages", says="at least one")


async def test_unknown_role_is_400_naming_the_role(app):
    response = await post(app, chat(messages=[USER, {"role": "wizard", "content": "x"}]))
    assert_invalid(response, "messages[1].role", says="'user'")


async def test_temperature_above_2_is_400(app):
    assert_invalid(await post(app, chat(temperature=5)), "temperature",
                   says="less than or equal to 2")


async def test_top_logprobs_without_logprobs_is_400(app):
    assert_invalid(await post(app, chat(top_logprobs=3)), "top_logprobs",
                   says="requires logprobs")


async def test_201_messages_exceed_the_limit_of_200(app):
    response = await post(app, chat(messages=[USER] * 201))
    assert_invalid(response, "messages", says="at most 200 messages")


async def test_200_messages_are_accepted(app):
    assert_accepted(await post(app, chat(messages=[USER] * 200)))


async def test_unknown_model_is_404_model_not_found(app):
    response = await post(app, chat(model="gpt-4o"))
    assert_invalid(response, "model", status=404, code="model_not_found", says="gpt-4o")


# -- more field rules ------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "must not be empty"),
    ({"stop": 7}, "stop", "string or an array"),
    ({"logit_bias": {"42": 101}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"hello": 1}}, "logit_bias", "not a token id"),
    ({"seed": 2**63}, "seed", "less than or equal to"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({"tools": []}, "tools", "at least 1"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 65}, "tools", "at most 64"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", "not in tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "must be 'none'"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "'text'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "needs 'json_schema'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}}]}, "tools", "repeated"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]},
     "tools[0].function.parameters", "not a valid JSON schema at '#/properties/a/type'"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "patternProperties": {"^a": {}}}}}]},
     "tools[0].function.parameters", "'patternProperties' is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools[0].function.parameters", "\"type\": \"object\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "minProperties": "two"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}},
     "response_format.json_schema.schema", "'if' is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"d": {"type": "string", "format": "iri"}}}}}},
     "response_format.json_schema.schema", "format 'iri' is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "$ref": "https://example.com/schema.json"}}}},
     "response_format.json_schema.schema", "only local references"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "must not exceed"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than or equal to 0.1"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty", "greater than or equal to 0.1"),
    ({"model": 3}, "model", "valid string"),
    # Unbounded fields (issue 13, finding 5): each a 400 naming the field, never a 500.
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {str(2**40): 1}}, "logit_bias", "not a token id"),
    ({"stop": ["x" * 257]}, "stop", "at most 256 characters"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids", "token ids"),
    ({"top_k": 2**32}, "top_k", "less than or equal to 2147483647"),
    ({"seed": 2**70}, "seed", ""),
    ({"max_tokens": 2**63}, "max_tokens", ""),
    ({"max_completion_tokens": 1e30}, "max_completion_tokens", ""),
    ({"min_tokens": 2**63}, "min_tokens", ""),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function",
        "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}]},
     "messages[1].tool_calls[0].function.arguments", "at most 64 levels"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function",
        "function": {"name": "f", "arguments": '{"a": ' * 100 + "1" + "}" * 100}}]}]},
     "messages[1].tool_calls[0].function.arguments", "at most 64 levels"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
        "$ref": "#/$defs/a"}}}},
     "response_format.json_schema.schema", "leads back to itself"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "$ref": "#"}}}}, "response_format.json_schema.schema", "leads back to itself"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "anyOf": [{"$ref": "#"}]}}}]},
     "tools[0].function.parameters", "leads back to itself"),
])
async def test_field_out_of_range_is_400_naming_the_field(app, fields, param, says):
    assert_invalid(await post(app, chat(**fields)), param, says=says)


@pytest.mark.parametrize(("messages", "param", "says"), [
    ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", "tool_call_id"),
    ([{"role": "assistant", "content": None}], "messages[0].content", "'tool_calls'"),
    ([{"role": "user"}], "messages[0].content", "need 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content", "only 'text'"),
    ([{"role": "user", "content": []}], "messages[0].content", "empty array"),
    ([{"role": "user", "content": 12}], "messages[0].content", "string or an array"),
    ([{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages[0].tool_calls", "only assistant"),
    (["hello"], "messages[0]", "valid dictionary"),
])
async def test_role_rules_are_400_naming_the_message_field(app, messages, param, says):
    assert_invalid(await post(app, chat(messages=messages)), param, says=says)


async def test_body_that_is_not_an_object_is_400(app):
    assert_invalid(await post(app, [USER]), None, says="JSON object")


# -- accepted shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"temperature": 0, "top_p": 0, "n": 16, "stop": "\n", "seed": -5},
    {"temperature": 1e-40, "repetition_penalty": 0.1},  # greedy; the lowest penalty
    {"logit_bias": {str(i): -1 for i in range(300)}, "stop": ["x" * 256] * 4,
     "stop_token_ids": list(range(64)), "top_k": 2**31 - 1},
    {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {
            "name": "f", "arguments": '{"a": ' * 63 + "1" + "}" * 63}}]}]},
    {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "[[[ not JSON"}}]}]},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "tree", "schema": {
        "$defs": {"node": {"type": "object", "properties": {
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}}}},
    {"logprobs": True, "top_logprobs": 0, "logit_bias": {"42": -100, "7": 100}},
    {"max_tokens": 5, "max_completion_tokens": 7, "presence_penalty": -2,
     "frequency_penalty": 2},
    {"stream": False, "user": "u-1", "parallel_tool_calls": True},
    {"response_format": {"type": "text"}},
    {"top_k": -1, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1,
     "ignore_eos": False, "cache_salt": "s", "priority": -3, "stop_token_ids": [2]},
    {"metadata": {"a": "b"}, "store": False, "service_tier": "auto", "made_up_field": [1, 2]},
    {"tools": [{"type": "function", "function": {"name": "get_time"}}], "tool_choice": "none"},
])
async def test_valid_fields_and_unknown_fields_are_accepted(app, fields):
    assert_accepted(await post(app, chat(**fields)))


async def test_all_roles_and_text_parts_are_accepted(app):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "text", "text": "In Paris."}], "name": "ann"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    assert_accepted(await post(app, chat(messages=messages)))


def test_tool_turns_validate_and_reach_the_template_as_openai_dicts():
    # (SmolLM2's own template cannot render a null content; templates that can get this.)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}
    req = parse_chat_request(chat(messages=[
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18"},
                                                               {"type": "text", "text": "C"}]},
    ]), max_messages=200)
    assert [m.to_template_dict() for m in req.messages] == [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "18\nC", "tool_call_id": "call_1"},
    ]


# -- structured output and tools: accepted, and reaching a worker -----------------------------

@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "strict": True, "schema": {"type": "object"}}}},
    {"tools": [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]},
    {"tools": [{"type": "function", "function": {"name": "get_time"}}],
     "tool_choice": "required", "parallel_tool_calls": False},
    {"tools": [{"type": "function", "function": {"name": "get_time"}}],
     "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
])
async def test_structured_output_and_tool_requests_reach_a_worker(app, fields):
    # SmolLM2's template has no tools section: the fallback renders them, nothing is refused.
    assert_accepted(await post(app, chat(**fields)))


async def test_a_schema_nested_too_deeply_is_400_not_a_stack_overflow(app):
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(500):
        schema = {"type": "array", "items": schema}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
    assert_invalid(await post(app, chat(response_format=fmt)),
                   "response_format.json_schema.schema", says="nested more than 64 levels")


async def test_tools_with_a_json_response_format_are_400(app):
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    assert_invalid(await post(app, chat(tools=tools, response_format={"type": "json_object"})),
                   "response_format", says="cannot be combined with tools")


@pytest.mark.parametrize("schema, says", COMPILE_REFUSED)
async def test_a_schema_the_grammar_library_refuses_is_400_at_the_router(app, schema, says):
    """What the router accepts is what the worker compiles (core/grammar.py, one piece of
    code for both): the subset check passes these, llguidance does not, and the router says
    so; before, the request went on to a worker (here: 503, there is none)."""
    check_schema(schema)  # within the subset: only the grammar library can tell
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    error = assert_invalid(await post(app, chat(response_format=fmt)), "response_format",
                           says="the grammar cannot be compiled")
    assert says.lower() in error["message"].lower()
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": schema}, "required": ["a"]}}}
    assert_invalid(await post(app, chat(tools=[tool])), "tools",
                   says="the grammar cannot be compiled")


async def test_a_strict_schema_is_checked_as_the_worker_closes_it(app):
    # Strict closes objects (additionalProperties: false), which makes a required key that
    # no property declares unsatisfiable: the router checks the spec the worker compiles.
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}
    body = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert_accepted(await post(app, chat(response_format=body)))
    body["json_schema"]["strict"] = True
    assert_invalid(await post(app, chat(response_format=body)), "response_format",
                   says="required property 'b' is unsatisfiable")


async def test_a_large_body_is_checked_by_the_grammar_library_too(app):
    # Past 16 KiB the whole validation runs on a thread; the grammar check is part of it.
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "description":
                                                          "x" * 40} for i in range(400)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    assert_accepted(await post(app, chat(response_format=fmt)))
    schema["properties"]["p0"]["pattern"] = "\\bword"
    assert_invalid(await post(app, chat(response_format=fmt)), "response_format",
                   says="lookarounds not supported")


# -- the converter to the wire and the context budget -----------------------------------------

def request(**fields: Any) -> ChatCompletionRequest:
    return parse_chat_request(chat(**fields), max_messages=200)


def test_wire_request_sets_openai_defaults_explicitly():
    msg = to_generate_request(request(), request_id="r", prompt_token_ids=[1, 2, 3],
                              max_tokens=10, model="electron")
    s = msg.sampling
    assert (s.n, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (1, 1.0, 1.0, 0, 1.0)
    assert s.max_tokens == 10 and not s.HasField("seed")
    assert list(msg.token_ids) == [1, 2, 3] and msg.model == "electron"


def test_wire_request_maps_edge_values():
    msg = to_generate_request(
        request(temperature=0, top_p=0, top_k=-1, seed=-1, priority=5, n=3,
                logit_bias={"42": -100}, stop="END", logprobs=True, top_logprobs=4,
                cache_salt="tenant"),
        request_id="r", prompt_token_ids=[1], max_tokens=4, model="electron")
    s = msg.sampling
    assert s.temperature == 0 and s.HasField("top_p") and s.top_p == 0  # the likeliest token
    assert s.top_k == 0 and s.seed == 2**64 - 1 and msg.priority == -5
    assert s.n == 3 and dict(s.logit_bias) == {42: -100.0} and list(s.stop) == ["END"]
    assert s.logprobs and s.top_logprobs == 4 and msg.cache_salt == "tenant"


def test_the_largest_accepted_values_fit_the_wire():
    # The proto's uint32 top_k and token ids, uint64 seed: nothing accepted overflows them.
    msg = to_generate_request(
        request(top_k=2**31 - 1, seed=2**63 - 1, stop_token_ids=[2**31 - 1],
                logit_bias={str(2**31 - 1): 100}),
        request_id="r", prompt_token_ids=[1], max_tokens=4, model="electron")
    assert msg.sampling.top_k == 2**31 - 1 and msg.sampling.seed == 2**63 - 1


def test_unset_max_tokens_is_clamped_to_the_room_left():
    assert completion_budget(request(), 100, 128) == 28


def test_explicit_max_tokens_beyond_the_room_left_is_rejected():
    with pytest.raises(ContextLengthExceeded) as info:
        completion_budget(request(max_completion_tokens=29), 100, 128)
    assert info.value.param == "max_completion_tokens"
    assert "129 tokens (100 in the messages, 29 in the completion)" in info.value.message
    assert completion_budget(request(max_tokens=28), 100, 128) == 28


def test_prompt_filling_the_window_is_context_length_exceeded():
    with pytest.raises(ContextLengthExceeded) as info:
        completion_budget(request(), 128, 128)
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"


def test_min_tokens_beyond_the_clamped_budget_is_rejected():
    with pytest.raises(InvalidRequest) as info:
        completion_budget(request(min_tokens=50), 100, 128)
    assert info.value.param == "min_tokens"


def test_a_response_built_whole_is_bounded_before_any_work():
    limit = RouterConfig().max_buffered_tokens
    # n=16 x 20 top logprobs x a whole 8k context: ~2.8 M entries, refused naming the field.
    req = request(n=16, logprobs=True, top_logprobs=20, max_tokens=8000)
    with pytest.raises(InvalidRequest) as info:
        check_buffered_size(req, 8000, limit)
    assert info.value.param == "max_tokens" and "at most" in info.value.message
    # Unset max_tokens (the budget is the room left): n is what to lower.
    with pytest.raises(InvalidRequest) as info:
        check_buffered_size(request(n=16, logprobs=True, top_logprobs=20), 8000, limit)
    assert info.value.param == "n"
    # An ordinary request, and the same one asking for what fits, pass.
    check_buffered_size(request(max_tokens=8000), 8000, limit)
    most = limit // (16 * 21)
    check_buffered_size(request(n=16, logprobs=True, top_logprobs=20, max_tokens=most), most,
                        limit)


def test_a_schema_with_too_many_values_is_refused_before_the_metaschema_check():
    huge_enum = {"type": "json_schema", "json_schema": {"name": "e", "schema": {
        "enum": list(range(5000))}}}
    with pytest.raises(InvalidRequest) as refused:
        request(response_format=huge_enum)
    assert refused.value.param == "response_format.json_schema.schema"
    assert "values" in refused.value.message
    fits = {"type": "json_schema", "json_schema": {"name": "e", "schema": {
        "enum": list(range(1000))}}}
    request(response_format=fits)
