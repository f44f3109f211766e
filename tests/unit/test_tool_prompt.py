"""What the model is shown for tools and structured output, and the grammar spec the worker gets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.chat_template import ChatTemplate
from core.model_files import resolve_model_path
from core.pb.electron.v1 import worker_pb2 as pb
from core.tokenizer import Tokenizer
from router.chat.wire import to_generate_request
from router.openai.schemas import ChatCompletionRequest, parse_chat_request
from router.tools.grammar_spec import (
    NO_PARAMETERS,
    asks_for_filler,
    grammar_spec,
    tool_use,
)
from router.tools.prompt import template_inputs

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
USER = {"role": "user", "content": "What's the weather in Paris?"}
VOICE = {"role": "system", "content": "You are a voice agent. Before calling a tool, briefly "
                                      "acknowledge the request so the caller is not left waiting."}


def request(**fields: Any) -> ChatCompletionRequest:
    return parse_chat_request({"model": "electron", "messages": [USER], **fields},
                              max_messages=200)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


def rendered(tokenizer: Tokenizer, req: ChatCompletionRequest) -> str:
    messages, tools = template_inputs(req, tool_use(req),
                                      template_supports_tools=tokenizer.supports_tools)
    return tokenizer.apply_chat_template(messages, tools)


# -- the fallback prompt (SmolLM2's template has no tools section) ---------------------------

def test_smollm2_prompt_lists_the_tools_and_the_call_format(tokenizer):
    text = rendered(tokenizer, request(tools=[WEATHER, CLOCK]))
    assert text.startswith("<|im_start|>system\nYou can call these tools")
    listed = text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["name"] for line in listed] == ["get_weather", "get_time"]
    assert json.loads(listed[0])["parameters"] == WEATHER["function"]["parameters"]
    assert '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>' in text
    assert "If no tool is needed, answer the user directly" in text
    assert text.endswith("<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_tool_section_joins_the_clients_system_prompt(tokenizer):
    text = rendered(tokenizer, request(messages=[VOICE, USER], tools=[WEATHER],
                                       tool_choice="required", parallel_tool_calls=False))
    assert text.startswith("<|im_start|>system\nYou are a voice agent.")
    assert text.count("<|im_start|>system") == 1
    assert "You must call at least one tool." in text and "Call at most one tool." in text
    assert "Before the first call, say one short sentence" in text


def test_named_tool_choice_is_stated(tokenizer):
    choice = {"type": "function", "function": {"name": "get_time"}}
    assert "You must call the tool get_time." in rendered(
        tokenizer, request(tools=[WEATHER, CLOCK], tool_choice=choice))


def test_tool_choice_none_shows_no_tools(tokenizer):
    text = rendered(tokenizer, request(tools=[WEATHER], tool_choice="none"))
    assert "<tools>" not in text and "helpful AI assistant named SmolLM" in text


def test_earlier_calls_and_tool_results_render_in_the_same_format(tokenizer):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    text = rendered(tokenizer, request(tools=[WEATHER], messages=[
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "18 C, sunny"},
        {"role": "user", "content": "Thanks! And tomorrow?"},
    ]))
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert f"<|im_start|>assistant\n{one}\n{one}<|im_end|>" in text
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
            "<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
            "<|im_start|>user\nThanks! And tomorrow?") in text


def test_a_filler_sentence_in_history_stays_before_its_call(tokenizer):
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    text = rendered(tokenizer, request(messages=[
        USER, {"role": "assistant", "content": "One moment.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "12:00"}]))
    assert ('<|im_start|>assistant\nOne moment.\n<tool_call>{"name": "get_time", '
            '"arguments": {}}</tool_call><|im_end|>') in text


def test_a_template_that_reads_tools_gets_them_and_the_history_untouched():
    template = ChatTemplate("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                            "{% for m in messages %}{{ m.role }}:{{ m.content }};"
                            "{% endfor %}", {})
    req = request(tools=[WEATHER], messages=[
        USER, {"role": "tool", "tool_call_id": "c", "content": "sunny"}])
    messages, tools = template_inputs(req, tool_use(req), template_supports_tools=True)
    assert template.render(messages, tools) == (
        "[get_weather]user:What's the weather in Paris?;tool:sunny;")
    voice = request(tools=[WEATHER], messages=[VOICE, USER])
    messages, _ = template_inputs(voice, tool_use(voice), template_supports_tools=True)
    assert messages[0]["content"].endswith("say one short sentence to the user (for example "
                                           "\"Let me check that for you.\"), then write the call.")


def test_json_schema_request_gets_a_schema_hint(tokenizer):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    text = rendered(tokenizer, request(response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    assert "Answer with a JSON value only, matching this JSON schema:\n" + json.dumps(schema) \
        in text


# -- the filler heuristic ----------------------------------------------------------------------

@pytest.mark.parametrize("system", [
    VOICE["content"],
    "Always let the user know what you are doing before you use a tool.",
    "Say a short filler sentence while the tool runs.",
    "Before calling any function, tell the caller you are checking.",
    "Before using the booking tool, reassure the customer.",
])
def test_system_prompts_asking_to_acknowledge_turn_the_filler_on(system):
    assert asks_for_filler(request(messages=[{"role": "system", "content": system}, USER]))


@pytest.mark.parametrize("messages", [
    [USER],
    [{"role": "system", "content": "You are a concise weather assistant."}, USER],
    # Only system and developer messages configure the assistant.
    [{"role": "user", "content": "Acknowledge before calling a tool!"}],
])
def test_other_prompts_leave_the_filler_off(messages):
    assert not asks_for_filler(request(messages=messages))


# -- the grammar spec ------------------------------------------------------------------------

def test_tool_spec_carries_mode_parallel_and_filler():
    req = request(messages=[VOICE, USER], tools=[WEATHER, CLOCK], parallel_tool_calls=False,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = grammar_spec(req, tool_use(req)).tool_calls
    assert [(t.name, json.loads(t.parameters_json)) for t in calls.tools] == [
        ("get_weather", WEATHER["function"]["parameters"]), ("get_time", NO_PARAMETERS)]
    assert (calls.mode, calls.name, calls.parallel, calls.filler) == \
        (pb.GrammarSpec.TOOL_MODE_NAMED, "get_weather", False, True)


@pytest.mark.parametrize(("choice", "mode"), [(None, pb.GrammarSpec.TOOL_MODE_AUTO),
                                              ("auto", pb.GrammarSpec.TOOL_MODE_AUTO),
                                              ("required", pb.GrammarSpec.TOOL_MODE_REQUIRED)])
def test_tool_modes(choice, mode):
    req = request(tools=[CLOCK], **({"tool_choice": choice} if choice else {}))
    calls = grammar_spec(req, tool_use(req)).tool_calls
    assert (calls.mode, calls.name, calls.parallel, calls.filler) == (mode, "", True, False)


def test_response_formats_map_to_their_specs():
    schema = {"type": "object", "properties": {"n": {"type": "string"}}}
    assert grammar_spec(request(response_format={"type": "json_object"}), None) == \
        pb.GrammarSpec(json_object=pb.GrammarSpec.JsonObject())
    req = request(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": schema, "strict": True}})
    spec = grammar_spec(req, None)
    assert spec.WhichOneof("kind") == "json_schema" and spec.json_schema.strict
    assert json.loads(spec.json_schema.schema_json) == schema
    assert grammar_spec(request(response_format={"type": "text"}), None) is None
    assert grammar_spec(request(tools=[CLOCK], tool_choice="none"), None) is None


def test_unbounded_integers_are_bounded_to_safe_integers_in_the_spec():
    schema = {"$defs": {"N": {"type": ["integer", "null"]}}, "type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0},
        "c": {"type": "array", "items": {"anyOf": [{"type": "integer", "exclusiveMaximum": 5},
                                                   {"$ref": "#/$defs/N"}]}},
        "d": {"type": "number"}}}
    req = request(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": schema}})
    sent = json.loads(grammar_spec(req, None).json_schema.schema_json)
    safe = 2**53 - 1
    assert sent["properties"]["a"] == {"type": "integer", "minimum": -safe, "maximum": safe}
    assert sent["properties"]["b"] == {"type": "integer", "minimum": 0, "maximum": safe}
    assert sent["properties"]["c"]["items"]["anyOf"][0] == {
        "type": "integer", "exclusiveMaximum": 5, "minimum": -safe}
    assert sent["$defs"]["N"]["maximum"] == safe
    assert sent["properties"]["d"] == {"type": "number"}
    assert schema["properties"]["a"] == {"type": "integer"}  # the request is left as sent
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}}}}
    req = request(tools=[tool])
    parameters = grammar_spec(req, tool_use(req)).tool_calls.tools[0].parameters_json
    assert json.loads(parameters)["properties"]["n"]["maximum"] == safe


def test_the_spec_travels_in_sampling_params_grammar():
    req = request(response_format={"type": "json_object"})
    msg = to_generate_request(req, request_id="r", prompt_token_ids=[1], max_tokens=5,
                              model="electron", grammar=grammar_spec(req, None))
    assert msg.sampling.grammar == pb.GrammarSpec(json_object=pb.GrammarSpec.JsonObject())
    plain = to_generate_request(request(), request_id="r", prompt_token_ids=[1], max_tokens=5,
                                model="electron")
    assert not plain.sampling.HasField("grammar")
