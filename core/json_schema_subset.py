"""The JSON-schema subset that constrained decoding serves, and the check that a schema keeps to it.

A schema reaches us twice: as ``response_format.json_schema.schema`` and as a tool's
``parameters``. Both are compiled into a token grammar by the worker, and a grammar library
covers only part of JSON Schema, so a keyword it would ignore must be refused up front (a clear
400) rather than silently not enforced. The subset below is what both candidate grammar
libraries (xgrammar and llguidance) enforce; ``docs/tools.md`` lists it for users.

Plain Python (jsonschema for the metaschema), no torch: the router checks requests with it and
a worker may call it again on what it is asked to compile.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jsonschema

# Keywords whose value is a map of name -> subschema.
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})
# Keywords whose value is one subschema (additionalProperties may also be a boolean).
_SCHEMA_ONE = frozenset({"items", "additionalProperties"})
# Keywords whose value is a list of subschemas. ``allOf`` only with one member (pydantic's
# wrapper around a ``$ref`` with siblings): an intersection of several is not served.
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
# Keywords that constrain the value and whose own value is not a schema.
_CONSTRAINTS = frozenset({
    "type", "required", "enum", "const", "$ref",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "format", "minItems", "maxItems",
})
# Annotations: accepted and ignored (they do not constrain the value).
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "discriminator",
})
SUPPORTED_KEYWORDS = _SCHEMA_MAPS | _SCHEMA_ONE | _SCHEMA_LISTS | _CONSTRAINTS | _ANNOTATIONS
SUPPORTED_FORMATS = frozenset({"date-time", "date", "time", "duration", "email", "hostname",
                               "ipv4", "ipv6", "uuid"})
# JSON objects and arrays within each other (a subschema takes one to three levels): real
# schemas stay far below; jsonschema's checks recurse and overflow Python's stack near 200.
MAX_NESTING = 64
# Values in one schema (every object, array, string, number...): a 100k-entry enum took 1.6 s
# to check against the metaschema; this bounds every schema's check to milliseconds.
MAX_SCHEMA_VALUES = 4096
CHECK_CACHE_SIZE = 1024
# Regex features a grammar (a finite automaton) cannot express.
_NON_REGULAR = re.compile(r"\(\?<?[=!]|\\[1-9]|\\k<")


class UnsupportedSchema(ValueError):
    """The schema is not valid JSON Schema, or uses what constrained decoding cannot serve."""


def check_schema(schema: Any, *, require_object: bool = False) -> None:
    """Raises ``UnsupportedSchema`` (its message names the place) unless ``schema`` is a valid
    JSON schema (draft 2020-12) within ``SUPPORTED_KEYWORDS``. ``require_object``: the root
    must describe an object (tool parameters)."""
    if not isinstance(schema, Mapping):
        raise UnsupportedSchema("the schema must be a JSON object")
    if nesting(schema) > MAX_NESTING:
        # Before anything recursive (the metaschema check, json.dumps) can overflow the stack.
        raise UnsupportedSchema(f"the schema is nested more than {MAX_NESTING} levels deep")
    if values_in(schema, MAX_SCHEMA_VALUES) > MAX_SCHEMA_VALUES:
        raise UnsupportedSchema(f"the schema holds more than {MAX_SCHEMA_VALUES} values")
    error = _check_text(json.dumps(schema, sort_keys=True), require_object)
    if error is not None:
        raise UnsupportedSchema(error)


# Checking against the 2020-12 metaschema takes ~5 ms; clients send the same tools and schemas
# with every turn of a conversation, so verdicts are kept per schema text.
@functools.lru_cache(maxsize=CHECK_CACHE_SIZE)
def _check_text(text: str, require_object: bool) -> str | None:
    schema = json.loads(text)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"not a valid JSON schema at '#/{where}': {exc.message}"
    if require_object and schema.get("type") != "object":
        return "the root must be a schema of \"type\": \"object\""
    refs: list[tuple[Mapping[str, Any], str]] = []
    try:
        _walk(schema, schema, "#", refs)
        _check_ref_loops(schema, refs)
    except UnsupportedSchema as exc:
        return str(exc)
    return None


def values_in(value: Any, limit: int) -> int:
    """How many JSON values ``value`` holds, itself included (counting stops past ``limit``)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return count


def nesting(value: Any) -> int:
    """How deeply JSON objects and arrays nest in ``value`` (without recursion; counting
    stops a level past ``MAX_NESTING``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _walk(node: Any, root: Mapping[str, Any], where: str,
          refs: list[tuple[Mapping[str, Any], str]]) -> None:
    """Checks every subschema; collects those holding a ``$ref`` (with their place)."""
    if node is True:
        return
    if node is False or not isinstance(node, Mapping):
        raise UnsupportedSchema(f"{where}: a subschema must be an object or true")
    for key, value in node.items():
        at = f"{where}/{key}"
        if key not in SUPPORTED_KEYWORDS:
            raise UnsupportedSchema(f"{at}: the keyword '{key}' is not supported by constrained "
                                    "decoding (see the supported subset in docs/tools.md)")
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                _walk(sub, root, f"{at}/{name}", refs)
        elif key == "additionalProperties" and isinstance(value, bool):
            continue
        elif key in _SCHEMA_ONE:
            _walk(value, root, at, refs)
        elif key in _SCHEMA_LISTS:
            if key == "allOf" and len(value) != 1:
                raise UnsupportedSchema(f"{at}: 'allOf' is supported with one subschema only")
            for i, sub in enumerate(value):
                _walk(sub, root, f"{at}/{i}", refs)
        elif key == "format" and value not in SUPPORTED_FORMATS:
            raise UnsupportedSchema(f"{at}: the format '{value}' is not supported (supported: "
                                    f"{', '.join(sorted(SUPPORTED_FORMATS))})")
        elif key == "pattern":
            _check_pattern(value, at)
        elif key == "$ref":
            _check_ref(value, root, at)
            refs.append((node, at))


def _check_pattern(pattern: str, at: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UnsupportedSchema(f"{at}: the pattern does not compile: {exc}") from None
    if _NON_REGULAR.search(pattern):
        raise UnsupportedSchema(f"{at}: lookarounds and backreferences are not supported in "
                                "patterns")


def _check_ref(ref: str, root: Mapping[str, Any], at: str) -> Any:
    """Only references inside the schema itself (``#``, ``#/$defs/...``) can be compiled.
    Returns the subschema ``ref`` points at."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise UnsupportedSchema(f"{at}: only local references ('#/$defs/...') are supported, "
                                f"not '{ref}'")
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise UnsupportedSchema(f"{at}: the reference '{ref}' points at nothing")
        node = node[part]
    return node


# Keywords whose subschemas describe the same place of the value as their parent: a path of
# these and ``$ref``s consumes no input. properties, items etc. step into the value.
_SAME_PLACE = ("anyOf", "oneOf", "allOf")


def _check_ref_loops(root: Mapping[str, Any],
                     refs: list[tuple[Mapping[str, Any], str]]) -> None:
    """Refuses a ``$ref`` that leads back to where it is without stepping into the value
    (``{"$ref": "#"}`` at the root, ``a -> b -> a`` in ``$defs``, ``anyOf: [{"$ref": "#"}]``):
    a grammar built from it admits no JSON at all (the reply would be empty, not JSON).
    Recursion through ``properties`` or ``items`` (a tree of nodes) is fine."""

    def successors(node: Any) -> list[Any]:
        if not isinstance(node, Mapping):
            return []
        out = [_check_ref(node["$ref"], root, "#")] if isinstance(node.get("$ref"), str) else []
        for key in _SAME_PLACE:
            if isinstance(node.get(key), list):
                out.extend(node[key])
        return out

    done: set[int] = set()  # id() of nodes whose every same-place path was followed
    for start, at in refs:
        if id(start) in done:
            continue
        on_path = {id(start)}
        stack = [(start, iter(successors(start)))]
        while stack:
            node, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                stack.pop()
                on_path.discard(id(node))
                done.add(id(node))
            elif id(nxt) in on_path:
                raise UnsupportedSchema(
                    f"{at}: the reference '{start['$ref']}' leads back to itself without going "
                    "through 'properties' or 'items': constrained decoding cannot serve a loop")
            elif id(nxt) not in done:
                on_path.add(id(nxt))
                stack.append((nxt, iter(successors(nxt))))


# The integers every JSON parser reads exactly (JavaScript's safe integers).
SAFE_INTEGER = 2**53 - 1


def map_subschemas(schema: Any, visit: Callable[[dict[str, Any]], dict[str, Any]], *,
                   maps: Collection[str], singles: Collection[str]) -> Any:
    """A copy of ``schema`` in which ``visit`` has rewritten every subschema reached through
    the keywords in ``maps`` (name -> subschema) and ``singles`` (a subschema, or a list of
    them), innermost first, and then the schema itself. Other values are kept as they are."""
    if isinstance(schema, list):
        return [map_subschemas(item, visit, maps=maps, singles=singles) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in maps and isinstance(value, Mapping):
            out[key] = {name: map_subschemas(sub, visit, maps=maps, singles=singles)
                        for name, sub in value.items()}
        elif key in singles:
            out[key] = map_subschemas(value, visit, maps=maps, singles=singles)
        else:
            out[key] = value
    return visit(out)


def with_bounded_integers(schema: Any) -> Any:
    """A copy of ``schema`` whose integer schemas without a lower or upper bound get
    ``±SAFE_INTEGER``. A grammar admits integers of any length, and a small model can loop on
    digits until ``max_tokens`` (SmolLM2 writes 1234567890123... when shown some schemas);
    the bound caps an integer at 16 digits. Anything it admits still validates against the
    schema as given."""
    return map_subschemas(schema, _bound_integers, maps=_SCHEMA_MAPS,
                          singles=_SCHEMA_ONE | _SCHEMA_LISTS)


def _bound_integers(out: dict[str, Any]) -> dict[str, Any]:
    kinds = out.get("type")
    if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
    return out
