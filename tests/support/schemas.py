"""Varied JSON schemas and tools for structured-output tests (engine and router alike).

``SCHEMAS``: (name, prompt, schema) triples, at least 40, covering nested objects, arrays,
enums, numbers with bounds, required and optional fields, nullable fields and ``anyOf``.
``TOOLS``: OpenAI-style function tools with parameter schemas.
``COMPILE_REFUSED``: schemas within the subset that the grammar library refuses.
``schema_spec``, ``json_object_spec``, ``tool_spec``: the worker's ``GrammarSpec`` messages.
"""

from __future__ import annotations

import json
from typing import Any

from core.pb.electron.v1 import worker_pb2 as pb

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: list[str] | None = None,
        **extra: Any) -> Schema:
    """An object schema; every property required unless ``required`` says otherwise."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **extra}


STR: Schema = {"type": "string", "maxLength": 40}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}


def enum(*values: Any) -> Schema:
    return {"enum": list(values)}


def array(items: Schema, lo: int = 0, hi: int = 4) -> Schema:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def bounded(kind: str, lo: float, hi: float) -> Schema:
    return {"type": kind, "minimum": lo, "maximum": hi}


_BASE: list[tuple[str, str, Schema]] = [
    ("person", "a fictional person", obj({"name": STR, "age": bounded("integer", 0, 120)})),
    ("person_optional_email", "a person, email optional",
     obj({"name": STR, "email": STR}, required=["name"])),
    ("city", "a city", obj({"city": STR, "country": STR, "population": bounded("integer", 0, 40_000_000)})),
    ("weather", "today's weather", obj({"temperature": bounded("number", -60, 60),
                                        "condition": enum("sunny", "cloudy", "rain", "snow")})),
    ("book", "a book", obj({"title": STR, "author": STR, "year": bounded("integer", 1400, 2030)})),
    ("movie_tags", "a movie with tags", obj({"title": STR, "tags": array(STR, 1, 3)})),
    ("todo_list", "a todo list", obj({"items": array(obj({"task": STR, "done": BOOL}), 1, 3)})),
    ("color_rgb", "a color", obj({"r": bounded("integer", 0, 255), "g": bounded("integer", 0, 255),
                                  "b": bounded("integer", 0, 255)})),
    ("point", "a 2D point", obj({"x": NUM, "y": NUM})),
    ("address_nested", "a person with an address",
     obj({"name": STR, "address": obj({"street": STR, "city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("order", "a shop order", obj({"order_id": INT, "lines": array(obj({"sku": STR, "qty": bounded("integer", 1, 10)}), 1, 3),
                                   "status": enum("new", "paid", "shipped")})),
    ("rating", "a product rating", obj({"product": STR, "stars": bounded("integer", 1, 5), "comment": STR},
                                       required=["product", "stars"])),
    ("boolean_flags", "feature flags", obj({"dark_mode": BOOL, "beta": BOOL})),
    ("nullable_middle_name", "a person with a nullable middle name",
     obj({"first": STR, "middle": {"type": ["string", "null"], "maxLength": 20}, "last": STR})),
    ("any_of_id", "an id that is a number or a string",
     obj({"id": {"anyOf": [INT, {"type": "string", "maxLength": 12}]}})),
    ("matrix", "a 2x2 matrix", obj({"rows": array(array(bounded("integer", -9, 9), 2, 2), 2, 2)})),
    ("event", "a calendar event", obj({"title": STR, "day": enum("mon", "tue", "wed", "thu", "fri"),
                                       "hour": bounded("integer", 0, 23)})),
    ("recipe", "a recipe", obj({"name": STR, "ingredients": array(STR, 1, 4),
                                "minutes": bounded("integer", 1, 300)})),
    ("employee", "an employee", obj({"name": STR, "salary": bounded("number", 0, 500000),
                                     "department": enum("eng", "sales", "hr")})),
    ("tree", "a small family tree", obj({"parent": STR, "children": array(obj({"name": STR}), 0, 3)})),
    ("unit_conversion", "a unit conversion", obj({"value": NUM, "from": enum("m", "ft"), "to": enum("m", "ft")})),
]


def _variants() -> list[tuple[str, str, Schema]]:
    """Each base schema as given, and again with its top-level fields optional and closed
    (``additionalProperties: false``): 42 schemas."""
    out = []
    for name, what, schema in _BASE:
        out.append((name, what, schema))
        closed = dict(schema, additionalProperties=False)
        keep = schema["required"][:1]
        out.append((f"{name}_closed_optional", what, dict(closed, required=keep)))
    return out


SCHEMAS: list[tuple[str, str, Schema]] = _variants()


def prompt_for(what: str) -> str:
    return f"Reply with one JSON object describing {what}."


TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": obj({"city": STR, "unit": enum("celsius", "fahrenheit")})}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": obj({"timezone": STR})}},
    {"type": "function", "function": {
        "name": "book_table", "description": "Book a restaurant table",
        "parameters": obj({"restaurant": STR, "people": bounded("integer", 1, 12),
                           "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
                          required=["restaurant", "people"])}},
]


# Schemas within our subset (core/json_schema_subset.py passes them) that the worker's grammar
# library refuses to compile (core/grammar.py), with a word of llguidance's reason.
COMPILE_REFUSED = [
    ({"type": "string", "pattern": "^[a-z]+\\Z"}, "unrecognized escape sequence"),  # Python-only
    ({"type": "string", "pattern": "\\bword\\b"}, "lookarounds not supported"),
    ({"type": "string", "pattern": "a$b"}, "lookarounds not supported"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength (5) is greater"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1}, "minItems"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "no integer values"),
    ({"type": "string", "enum": [1, 2]}, "incompatible types"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"},
                                                       {"type": "string"}]}}}, "oneOf"),
]


def schema_spec(schema: Any, *, strict: bool = True) -> pb.GrammarSpec:
    """A json_schema spec; ``schema`` is a JSON value, or text sent as it is."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return pb.GrammarSpec(json_schema=pb.GrammarSpec.JsonSchema(schema_json=text, strict=strict))


def json_object_spec() -> pb.GrammarSpec:
    return pb.GrammarSpec(json_object=pb.GrammarSpec.JsonObject())


def grammar_tool(name: str, parameters: Any = None) -> pb.GrammarSpec.Tool:
    """A tool as the spec lists it (``parameters`` None: sent as none)."""
    return pb.GrammarSpec.Tool(name=name, parameters_json="" if parameters is None
                               else json.dumps(parameters))


def tool_spec(mode: str = "required", name: str | None = None, parallel: bool = False,
              filler: bool = False, tools: list[dict[str, Any]] = TOOLS) -> pb.GrammarSpec:
    """A tool_calls spec of OpenAI-style ``tools``; ``mode`` auto, required or named."""
    return pb.GrammarSpec(tool_calls=pb.GrammarSpec.ToolCalls(
        tools=[grammar_tool(t["function"]["name"], t["function"].get("parameters"))
               for t in tools],
        mode=pb.GrammarSpec.ToolMode.Value(f"TOOL_MODE_{mode.upper()}"), name=name or "",
        parallel=parallel, filler=filler))
