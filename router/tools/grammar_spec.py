"""What a request asks the worker to constrain: the ``GrammarSpec`` message in
``SamplingParams.grammar`` (proto/electron/v1/worker.proto describes its fields; docs/tools.md
the contract): a JSON object, a JSON schema, or tool calls (the tools, the mode ``auto`` /
``required`` / ``named``, the named function, ``parallel`` and ``filler``).

Integer schemas without bounds are sent bounded to JavaScript's safe integers
(``with_bounded_integers``): otherwise a small model can write digits until ``max_tokens``.

The filler heuristic lives here too: it decides ``filler``, and the prompt's tool section
(``router/tools/prompt.py``) asks for the sentence when it is on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from core.errors import InvalidRequest
from core.json_schema_subset import with_bounded_integers
from core.pb.electron.v1 import worker_pb2 as pb
from router.openai.schemas import ChatCompletionRequest

# A function declared without ``parameters`` takes none (OpenAI's reading).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}
# A system or developer message matching this asks the assistant to speak before it calls a
# tool (the voice-agent "filler" sentence). A false positive only allows a short sentence
# before the call; it never forces one.
FILLER_PATTERN = re.compile(
    r"acknowledg"
    r"|filler"
    r"|let (?:the )?(?:user|caller|customer) know"
    r"|(?:tell|inform|reassure) (?:the )?(?:user|caller|customer)"
    r"|before (?:calling|using|invoking|running|executing|making|you call|you use)\b"
    r"[^.]{0,40}\b(?:tool|function)"
    r"|while (?:the |a )?(?:tool|function)s? (?:runs?|is running|works?)",
    re.IGNORECASE)
_TOOL_MODES = {"auto": pb.GrammarSpec.TOOL_MODE_AUTO,
               "required": pb.GrammarSpec.TOOL_MODE_REQUIRED,
               "named": pb.GrammarSpec.TOOL_MODE_NAMED}


@dataclass(frozen=True)
class ToolUse:
    """How a request uses tools, when it does (``tool_choice`` is not ``none``)."""

    names: frozenset[str]
    mode: str               # "auto", "required" or "named"
    name: str | None        # the named function
    parallel: bool
    filler: bool


def tool_use(req: ChatCompletionRequest) -> ToolUse | None:
    if not req.tools or (req.tool_choice is not None and req.tool_choice.mode == "none"):
        return None
    choice = req.tool_choice
    mode = "auto" if choice is None else {"function": "named"}.get(choice.mode, choice.mode)
    return ToolUse(names=frozenset(t.function.name for t in req.tools), mode=mode,
                   name=choice.name if mode == "named" and choice else None,
                   parallel=req.parallel_tool_calls is not False,
                   filler=asks_for_filler(req))


def asks_for_filler(req: ChatCompletionRequest) -> bool:
    """Whether a system or developer message asks to acknowledge before using a tool."""
    return any(m.role in ("system", "developer") and m.content
               and FILLER_PATTERN.search(m.content) for m in req.messages)


def grammar_spec(req: ChatCompletionRequest, tools: ToolUse | None) -> pb.GrammarSpec | None:
    """The spec for this request, or None when its output is unconstrained."""
    fmt = req.response_format
    structured = fmt is not None and fmt.type != "text"
    if structured and tools is not None:
        raise InvalidRequest("response_format json_object / json_schema cannot be combined with "
                             "tools yet; send tool_choice 'none' or drop response_format",
                             param="response_format")
    if tools is not None:
        assert req.tools is not None
        declared = [pb.GrammarSpec.Tool(
            name=t.function.name,
            parameters_json=_json(with_bounded_integers(t.function.parameters or NO_PARAMETERS)))
            for t in req.tools]
        return pb.GrammarSpec(tool_calls=pb.GrammarSpec.ToolCalls(
            tools=declared, mode=_TOOL_MODES[tools.mode], name=tools.name or "",
            parallel=tools.parallel, filler=tools.filler))
    if not structured:
        return None
    assert fmt is not None
    if fmt.type == "json_schema" and fmt.json_schema and fmt.json_schema.json_schema is not None:
        schema = with_bounded_integers(fmt.json_schema.json_schema)
        return pb.GrammarSpec(json_schema=pb.GrammarSpec.JsonSchema(
            schema_json=_json(schema), strict=bool(fmt.json_schema.strict)))
    return pb.GrammarSpec(json_object=pb.GrammarSpec.JsonObject())


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
