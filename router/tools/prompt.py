"""The messages (and tools) handed to the chat template, with our fallback for templates that
cannot present tools.

A template that reads ``tools`` (Qwen, Llama 3.1, Hermes...) gets the OpenAI messages and tool
list as they are. One that does not (SmolLM2's) gets the one documented fallback
(docs/tools.md):

- a system section listing the tools, one JSON object per line inside ``<tools></tools>``, and
  asking for calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the format
  the worker's grammar enforces and ``router/tools/parser.py`` reads back);
- earlier assistant tool calls rendered in that same format after their content;
- ``tool`` messages rendered as a user turn of ``<tool_response>...</tool_response>`` blocks
  (consecutive results share one turn).

A structured-output request (``response_format`` json_object / json_schema) also gets a short
system hint with the schema: the grammar enforces it anyway, the hint makes the model's
choices within the grammar sensible.
"""

from __future__ import annotations

import json
from typing import Any

from core.chat_template import tool_arguments
from core.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from router.openai.schemas import ChatCompletionRequest
from router.tools.grammar_spec import ToolUse

TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_SYSTEM_ROLES = ("system", "developer")
FILLER_REQUEST = ("Before the first call, say one short sentence to the user (for example "
                  "\"Let me check that for you.\"), then write the call.")


def template_inputs(req: ChatCompletionRequest, tools: ToolUse | None, *,
                    template_supports_tools: bool
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the ``tools`` variable the chat template renders."""
    messages = [m.to_template_dict() for m in req.messages]
    sections: list[str] = []
    template_tools = None
    if template_supports_tools:
        if tools is not None:
            assert req.tools is not None
            template_tools = [t.model_dump(exclude_none=True) for t in req.tools]
            if tools.filler:
                sections.append(FILLER_REQUEST)
    else:
        messages = _fallback_history(messages)
        if tools is not None:
            sections.append(tools_section(req, tools))
    hint = _format_hint(req)
    if hint:
        sections.append(hint)
    if sections:
        messages = _with_system_section(messages, "\n\n".join(sections))
    return messages, template_tools


def tools_section(req: ChatCompletionRequest, tools: ToolUse) -> str:
    assert req.tools is not None
    listed = "\n".join(json.dumps({"name": t.function.name,
                                   "description": t.function.description or "",
                                   "parameters": t.function.parameters or {}},
                                  ensure_ascii=False)
                       for t in req.tools)
    lines = [
        "You can call these tools (one JSON object per tool):",
        f"<tools>\n{listed}\n</tools>",
        f"To call a tool, write a {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} block holding a JSON object "
        "with the tool's name and its arguments:",
        TOOL_CALL_OPEN + '{"name": "<tool name>", "arguments": {<arguments>}}' + TOOL_CALL_CLOSE,
    ]
    if tools.mode == "auto":
        lines.append("If no tool is needed, answer the user directly instead.")
    elif tools.mode == "required":
        lines.append("You must call at least one tool.")
    else:
        lines.append(f"You must call the tool {tools.name}.")
    lines.append("You may call several tools, one block each." if tools.parallel
                 else "Call at most one tool.")
    if tools.filler:
        lines.append(FILLER_REQUEST)
    return "\n".join(lines)


def _format_hint(req: ChatCompletionRequest) -> str | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
    if schema is None:
        return "Answer with a JSON object only."
    return ("Answer with a JSON value only, matching this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False))


def call_text(name: str, arguments: Any) -> str:
    """One call in the fallback format; ``arguments`` an object or the client's JSON string."""
    if isinstance(arguments, str):
        arguments = tool_arguments(arguments)  # not JSON: the string the client sent
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments},
                                       ensure_ascii=False) + TOOL_CALL_CLOSE


def _fallback_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    results_turn = False  # whether out[-1] is a turn of tool results
    for message in messages:
        if message["role"] == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{message['content']}\n{TOOL_RESPONSE_CLOSE}"
            if results_turn:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results_turn = True
            continue
        results_turn = False
        if message["role"] == "assistant" and message.get("tool_calls"):
            parts = [message["content"]] if message.get("content") else []
            parts += [call_text(c["function"]["name"], c["function"]["arguments"])
                      for c in message["tool_calls"]]
            message = {"role": "assistant", "content": "\n".join(parts)}
        out.append(message)
    return out


def _with_system_section(messages: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] in _SYSTEM_ROLES:
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{section}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]
