"""The grammar spec a request carries (``SamplingParams.grammar``) -> an llguidance grammar,
and the check that llguidance compiles it.

One piece of code for both ends, so that what the router accepts is what the worker enforces:
the router builds and checks each request's spec while it validates the request
(``router/tools/grammar_spec.py`` ``check_grammar``); the worker builds the same grammar and
compiles it against its tokenizer (``workers/engine/grammar.py``). The check needs no
tokenizer: our grammars name no token, so llguidance's verdict without one is the worker's
(``tests/unit/test_grammar.py`` compares the two on every schema the tests know).

The router builds the spec, a ``GrammarSpec`` message (proto/electron/v1/worker.proto), from
``response_format`` or ``tools``/``tool_choice``: a JSON object, a JSON schema (as JSON text,
``strict`` or not), or tool calls (the tools with their parameter schemas as JSON text, the
mode ``auto`` / ``required`` / ``named``, the named tool, ``parallel``, ``filler``).

Tool calls are written as ``<tool_call>{"name": "...", "arguments": {...}}</tool_call>``
(SmolLM2's template has no tools section; this is our documented format). In ``required`` and
``named`` modes the output is only calls, optionally preceded by one short filler sentence
(no ``<`` in it), then EOS. In ``auto`` mode the text is free until the model writes
``<tool_call>``; from there on the JSON must be a call of a declared tool.

Termination: JSON is written with fixed separators (``", "`` and ``": "``) and no other
whitespace, so a small model cannot loop on whitespace; once a grammar is complete the only
token it allows is EOS. Objects that declare ``properties`` are closed
(``additionalProperties: false`` where the schema says nothing) for strict schemas and for
tool arguments, as OpenAI's strict mode requires; what the grammar admits still validates
against the schema as given.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from llguidance import LLMatcher

from core.errors import InvalidRequest
from core.json_schema_subset import map_subschemas
from core.pb.electron.v1 import worker_pb2 as pb
from core.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# JSON layout inside every grammar: no free whitespace (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Parallel calls in one turn: a bound, so a looping model still ends.
MAX_PARALLEL_CALLS = 4
# The filler sentence: at most this many tokens and characters, and no '<' (calls start there).
FILLER_MAX_TOKENS = 30
FILLER_MAX_CHARS = 200
_TOOL_MODES = frozenset(pb.GrammarSpec.ToolMode.values())


# Verdicts kept per spec (by a digest: a spec may be a 1 MiB body's worth): clients send the
# same tools and schemas with every turn.
CHECK_CACHE_SIZE = 1024
_MODE_NAMES = {pb.GrammarSpec.TOOL_MODE_AUTO: "auto", pb.GrammarSpec.TOOL_MODE_REQUIRED:
               "required", pb.GrammarSpec.TOOL_MODE_NAMED: "named"}


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its serialised top-level form), the request field that declared
    it, which errors name, and what its output is, for the worker's budget-aware closing
    (``workers/engine/json_close.py``): ``kind`` "json" with the (closed) ``schema`` of the
    value, or "tools" with ``tools`` (name -> its closed parameters schema), ``mode`` and
    ``parallel``."""

    grammar: str
    param: str
    kind: str
    schema: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode: str = ""
    parallel: bool = False


def build_grammar(spec: pb.GrammarSpec) -> Grammar:
    """Checks a grammar spec and builds its grammar; raises InvalidRequest naming the request
    field the spec came from. (Whether llguidance compiles the grammar is ``check_grammar``'s
    question, or the worker's matcher's.)"""
    kind = spec.WhichOneof("kind")
    if kind == "json_object":
        schema = {"type": "object"}
        return Grammar(_json_grammar(schema), "response_format", "json", schema=schema)
    if kind == "json_schema":
        text = spec.json_schema.schema_json
        schema = _from_json(text, "'response_format.json_schema.schema'", "response_format")
        if not isinstance(schema, dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be a JSON object",
                                 param="response_format")
        if spec.json_schema.strict:
            schema = close_objects(schema)
        return Grammar(_json_grammar(schema), "response_format", "json", schema=schema)
    if kind == "tool_calls":
        grammar, params = _tool_grammar(spec.tool_calls)
        return Grammar(grammar, "tools", "tools", tools=params,
                       mode=_MODE_NAMES[spec.tool_calls.mode], parallel=spec.tool_calls.parallel)
    raise InvalidRequest("the grammar spec sets none of json_object, json_schema and tool_calls",
                         param="response_format")


def check_grammar(spec: pb.GrammarSpec) -> None:
    """Raises InvalidRequest (naming the request field) unless ``spec`` builds a grammar that
    llguidance compiles. Verdicts are cached per spec. Takes up to ~100 ms for the largest
    schemas the subset admits (llguidance releases the GIL meanwhile): the router calls it on
    a thread."""
    key = hashlib.blake2b(cache_key(spec), digest_size=16).digest()
    with _verdicts_lock:
        known = key in _verdicts
        if known:
            _verdicts.move_to_end(key)
            error = _verdicts[key]
    if not known:
        error = _verdict(spec)
        with _verdicts_lock:
            _verdicts[key] = error
            if len(_verdicts) > CHECK_CACHE_SIZE:
                _verdicts.popitem(last=False)
    if error is not None:
        raise InvalidRequest(error[0], param=error[1])


_verdicts: OrderedDict[bytes, tuple[str, str] | None] = OrderedDict()
_verdicts_lock = threading.Lock()  # the router checks on several threads


def _verdict(spec: pb.GrammarSpec) -> tuple[str, str] | None:
    """(message, param) of why ``spec`` cannot be served, or None."""
    try:
        grammar = build_grammar(spec)
    except InvalidRequest as exc:
        return exc.message, exc.param or "response_format"
    error = LLMatcher.validate_grammar(grammar.grammar)
    return None if not error else (compile_error(error), grammar.param)


def compile_error(error: str) -> str:
    """The message of a 400 for a grammar llguidance refuses."""
    return f"the grammar cannot be compiled: {short_error(error)}"


def short_error(error: str) -> str:
    """An llguidance error on one line, bounded (a regex error spans lines: the pattern, a
    caret under the fault, the reason)."""
    return " ".join((error or "unknown error").split())[:500]


def cache_key(spec: pb.GrammarSpec) -> bytes:
    """What compiled grammars and verdicts are cached under: equal specs give equal keys (in
    one process)."""
    return spec.SerializeToString(deterministic=True)


def _from_json(text: str, what: str, param: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not JSON: {exc}", param=param) from None


def _json_grammar(schema: dict[str, Any]) -> str:
    try:
        return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc}", param="response_format") from None


def _tool_grammar(spec: pb.GrammarSpec.ToolCalls) -> tuple[str, dict[str, dict[str, Any]]]:
    """The tool-call grammar, and the (closed) parameter schemas of the tools it admits."""
    if not spec.tools:
        raise InvalidRequest("'tools' must be a non-empty list", param="tools")
    params: dict[str, dict[str, Any]] = {}
    for tool in spec.tools:
        name = tool.name
        if not name:
            raise InvalidRequest("every tool needs a name", param="tools")
        if name in params:
            raise InvalidRequest(f"tool name {name!r} is repeated", param="tools")
        schema = _from_json(tool.parameters_json, f"the parameters of tool {name!r}", "tools")
        if not schema:  # none, null or {}: the function takes no arguments (OpenAI's reading)
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise InvalidRequest(f"the parameters of tool {name!r} must be a JSON schema",
                                 param="tools")
        params[name] = close_objects(schema)
    mode = spec.mode
    if mode not in _TOOL_MODES:
        raise InvalidRequest(f"unknown tool mode {mode}", param="tool_choice")
    if mode == pb.GrammarSpec.TOOL_MODE_NAMED:
        chosen = spec.name
        if chosen not in params:
            raise InvalidRequest(f"tool_choice names {chosen!r}, which is not in 'tools'",
                                 param="tool_choice")
        params = {chosen: params[chosen]}
    body = " | ".join(f"%json {json.dumps(_call_schema(name, schema))}"
                      for name, schema in params.items())
    more = f'("\\n"? call){{0,{MAX_PARALLEL_CALLS - 1}}}' if spec.parallel else ""
    call = f'call: "{TOOL_CALL_OPEN}" body "{TOOL_CALL_CLOSE}"\nbody: {body}\n'
    if mode == pb.GrammarSpec.TOOL_MODE_AUTO:
        # Free text that never holds TOOL_CALL_OPEN, or text up to the first TOOL_CALL_OPEN
        # (lazy: it ends there) followed by the rest of a call. (The tag holds no character
        # that a regex or a lark literal would read specially.)
        lark = (f"start: TEXT | text_open body \"{TOOL_CALL_CLOSE}\" {more}\n"
                f"TEXT: /(.|\\n)+/ & ~/(.|\\n)*{TOOL_CALL_OPEN}(.|\\n)*/\n"
                f"text_open[lazy]: /(.|\\n)*{TOOL_CALL_OPEN}/\n" + call)
    else:
        filler = ""
        if spec.filler:
            filler = "filler? "
            call += (f"filler[max_tokens={FILLER_MAX_TOKENS}]: "
                     f"/[^<\\x00-\\x1f]{{1,{FILLER_MAX_CHARS}}}\\n?/\n")
        lark = f"start: {filler}call {more}\n" + call
    return LLMatcher.grammar_from_lark(lark), params


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False,
            "x-guidance": JSON_OPTIONS}


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema that lists ``properties`` and says
    nothing about other keys gets ``additionalProperties: false``. ``allOf`` branches are left
    as they are (closing each would make their conjunction reject the others' keys), and so are
    ``not`` and ``if`` (closing them would widen what the schema admits)."""
    return map_subschemas(
        schema, _close, maps=("properties", "$defs", "definitions", "patternProperties"),
        singles=("items", "prefixItems", "anyOf", "oneOf", "additionalProperties", "contains",
                 "then", "else"))


def _close(out: dict[str, Any]) -> dict[str, Any]:
    if ("properties" in out and "additionalProperties" not in out
            and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out
