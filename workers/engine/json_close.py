"""The shortest way to finish constrained output: what budget-aware decoding forces.

For a grammar spec (``core/grammar.py``) and the text a sequence has generated so far, this
module computes the shortest text that completes it into an output the grammar accepts:
close the open string (its enum value, ``minLength`` or ``pattern``), end the number within its
bounds, write the shortest valid value for every required property still missing and for the
``minItems`` an array still lacks, close the containers, and for tool calls the rest of
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. The engine's grammar matcher
(``grammar.py``) tokenizes that text and forces its tokens when the budget is nearly spent,
checking each one against llguidance's mask (which stays the authority).

Plain Python (no torch, no llguidance): a small stack-based JSON scanner fed the output's
characters as they come, over the JSON-schema subset of ``core/json_schema_subset.py``, with
the grammar's fixed layout (``", "`` and ``": "`` separators, no other whitespace, properties
in their declared order: what llguidance enforces).

``Closer`` is built once per compiled grammar (cached with it); each sequence gets a
``CloseState`` (``Closer.state()``), fed with ``feed`` and asked ``completion()``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from core.json_schema_subset import UnsupportedSchema
from core.json_schema_subset import _check_ref as check_ref  # the one $ref resolver
from core.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

try:  # Python 3.11+
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]

Schema = dict[str, Any]
ANY: Schema = {}
_KEYWORDS_OBJECT = ("properties", "required", "additionalProperties")
_KEYWORDS_ARRAY = ("items", "prefixItems", "minItems", "maxItems")
_KEYWORDS_STRING = ("minLength", "maxLength", "pattern", "format")
_KEYWORDS_NUMBER = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# The shortest value of each supported string format (each checked against llguidance's).
FORMAT_EXAMPLES = {
    "date": "2000-01-01", "time": "00:00:00Z", "date-time": "2000-01-01T00:00:00Z",
    "duration": "P0D", "email": "a@a.aa", "hostname": "a", "ipv4": "0.0.0.0", "ipv6": "::",
    "uuid": "00000000-0000-0000-0000-000000000000",
}
# Formats as regexes, to finish a string already begun (llguidance's own are stricter in
# places; a completion it refuses falls back to its mask).
FORMAT_PATTERNS = {
    "date": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
    "time": r"^[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$",
    "date-time": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                 r"(Z|[+-][0-9]{2}:[0-9]{2})$",
    "duration": r"^P([0-9]+[YMWD])*(T([0-9]+[HMS])+)?$",
    "email": r"^[^@\s]+@[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)*\.[a-zA-Z]{2,}$",
    "hostname": r"^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?(\.[a-zA-Z0-9-]+)*$",
    "ipv4": r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_MAX_DEPTH = 48  # recursive $refs: deeper than this, a subschema counts as unwritable


def dumps(value: Any) -> str:
    """JSON text in the grammar's layout."""
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


class Unwritable(Exception):
    """No valid value exists (or none this module can find): the closer gives up."""


# -- schemas ------------------------------------------------------------------------------------


class Schemas:
    """One JSON schema's subschemas: references resolved, alternatives expanded, and the
    shortest value of each (memoised)."""

    def __init__(self, root: Any):
        self.root = root if isinstance(root, dict) else ({} if root in (True, None) else root)
        self._shortest: dict[int, str] = {}
        self._branches: dict[int, list[Schema]] = {}
        self._keep: list[Any] = []  # keeps memo keys (ids) alive

    def resolve(self, schema: Any, depth: int = 0) -> Schema:
        if schema is True or schema is None:
            return ANY
        if schema is False:
            raise Unwritable("false schema")
        if depth > _MAX_DEPTH:
            raise Unwritable("references nest too deep")
        ref = schema.get("$ref")
        if ref is not None:
            target = self._lookup(ref)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            merged = {**self.resolve(target, depth + 1), **rest} if rest else target
            return self.resolve(merged, depth + 1)
        all_of = schema.get("allOf")
        if all_of:
            merged = dict(self.resolve(all_of[0], depth + 1))
            for extra in all_of[1:]:
                merged.update(self.resolve(extra, depth + 1))
            merged.update({k: v for k, v in schema.items() if k != "allOf"})
            return self.resolve(merged, depth + 1)
        return schema

    def _lookup(self, ref: str) -> Any:
        try:
            return check_ref(ref, self.root, "$ref")
        except UnsupportedSchema as exc:
            raise Unwritable(str(exc)) from None

    def _memoised(self, table: dict[int, Any], schema: Any, depth: int, what: str,
                  compute: Any) -> Any:
        """``compute()`` once per subschema (by identity; the subschema is kept alive)."""
        key = id(schema)
        cached = table.get(key)
        if cached is not None:
            return cached
        if depth > _MAX_DEPTH:
            raise Unwritable(what)
        value = compute()
        self._keep.append(schema)
        table[key] = value
        return value

    def branches(self, schema: Any, depth: int = 0) -> list[Schema]:
        """The alternatives of ``schema``: every anyOf/oneOf member (with the siblings merged
        in) and every type of a type list, each with at most one type; refs resolved."""
        return self._memoised(self._branches, schema, depth, "alternatives nest too deep",
                              lambda: self._branches_of(schema, depth))

    def _branches_of(self, schema: Any, depth: int) -> list[Schema]:
        resolved = self.resolve(schema)
        out: list[Schema] = []
        alts = resolved.get("anyOf") or resolved.get("oneOf")
        if alts:
            rest = {k: v for k, v in resolved.items() if k not in ("anyOf", "oneOf")}
            for alt in alts:
                if alt is False:
                    continue
                merged = {**rest, **self.resolve(alt)} if rest else alt
                out.extend(self.branches(merged, depth + 1))
        else:
            types = resolved.get("type")
            if isinstance(types, list):
                out.extend({**resolved, "type": t} for t in types)
            else:
                out.append(resolved)
        return out

    def shortest(self, schema: Any, depth: int = 0) -> str:
        """The shortest JSON text valid against ``schema`` (in the grammar's layout)."""
        return self._memoised(self._shortest, schema, depth, "the schema recurses without end",
                              lambda: self._shortest_of(schema, depth))

    def _shortest_of(self, schema: Any, depth: int) -> str:
        best: str | None = None
        for branch in self.branches(schema):
            try:
                text = self._shortest_branch(branch, depth)
            except Unwritable:
                continue
            if best is None or len(text) < len(best):
                best = text
        if best is None:
            raise Unwritable("no alternative can be written")
        return best

    def _shortest_branch(self, s: Schema, depth: int) -> str:
        if "const" in s:
            return dumps(s["const"])
        if "enum" in s:
            if not s["enum"]:
                raise Unwritable("empty enum")
            return min((dumps(v) for v in s["enum"]), key=len)
        kind = type_of(s)
        if kind == "null":
            return "null"
        if kind == "boolean":
            return "true"
        if kind in ("integer", "number"):
            return finish_number("", s, kind == "integer")
        if kind == "string":
            return '"' + finish_string("", s) + '"'
        if kind == "array":
            return "[" + ", ".join(self.shortest(self.item(s, i), depth + 1)
                                   for i in range(int(s.get("minItems", 0)))) + "]"
        if kind == "object":
            return "{" + ", ".join(f"{dumps(k)}: {self.shortest(self.prop(s, k), depth + 1)}"
                                   for k in required_order(s)) + "}"
        return "0"  # any JSON value

    def item(self, s: Schema, index: int) -> Any:
        prefix = s.get("prefixItems") or []
        if index < len(prefix):
            return prefix[index]
        items = s.get("items", True)
        return ANY if items is True else items

    def prop(self, s: Schema, key: str) -> Any:
        props = s.get("properties") or {}
        if key in props:
            return props[key]
        extra = s.get("additionalProperties", True)
        return ANY if extra is True else extra

    def all_subschemas(self) -> Iterable[Any]:
        """Every subschema reachable from the root (each once)."""
        seen: set[int] = set()
        todo: list[Any] = [self.root]
        while todo:
            s = todo.pop()
            if not isinstance(s, dict) or id(s) in seen:
                continue
            seen.add(id(s))
            yield s
            try:
                todo.append(self.resolve(s))
            except Unwritable:
                continue
            for k in ("items", "additionalProperties"):
                if isinstance(s.get(k), dict):
                    todo.append(s[k])
            for k in ("properties", "$defs", "definitions"):
                todo.extend((s.get(k) or {}).values())
            for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
                todo.extend(s.get(k) or ())


def type_of(s: Schema) -> str | None:
    kind = s.get("type")
    if isinstance(kind, str):
        return kind
    if any(k in s for k in _KEYWORDS_OBJECT):
        return "object"
    if any(k in s for k in _KEYWORDS_ARRAY):
        return "array"
    if any(k in s for k in _KEYWORDS_STRING):
        return "string"
    if any(k in s for k in _KEYWORDS_NUMBER):
        return "number"
    return None


def required_order(s: Schema) -> list[str]:
    """Required keys in the order the grammar writes them: declared properties first, in
    their order, then any others."""
    required = s.get("required") or []
    props = list((s.get("properties") or {}).keys())
    return ([k for k in props if k in required]
            + [k for k in required if k not in props])


def _accepts_kind(s: Schema, kind: str) -> bool:
    """Whether a branch may hold a value that starts as ``kind`` (object, array, string,
    number, literal)."""
    if "const" in s or "enum" in s:
        values = [s["const"]] if "const" in s else s["enum"]
        return any(_kind_of_value(v) == kind for v in values)
    t = type_of(s)
    if t is None:
        return True
    if kind == "number":
        return t in ("integer", "number")
    if kind == "literal":
        return t in ("boolean", "null")
    return t == kind


def _kind_of_value(v: Any) -> str:
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bool) or v is None:
        return "literal"
    return "number"


# -- scalars ------------------------------------------------------------------------------------


def _in_bounds(text: str, s: Schema, integer: bool) -> bool:
    if not (_INTEGER if integer else _NUMBER).fullmatch(text):
        return False
    if not any(k in s for k in _KEYWORDS_NUMBER):
        return True  # no bounds: any number (even one past float's range) will do
    try:
        x = float(text) if not integer else int(text)
    except (ValueError, OverflowError):
        return False
    if not math.isfinite(float(x)):
        return False
    lo, hi = s.get("minimum"), s.get("maximum")
    xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
    return not ((lo is not None and x < lo) or (hi is not None and x > hi)
                or (xlo is not None and x <= xlo) or (xhi is not None and x >= xhi))


def finish_number(prefix: str, s: Schema, integer: bool) -> str:
    """The shortest suffix that makes ``prefix`` a number within the schema's bounds."""
    candidates: list[str] = [""]
    digits = "0159"
    layer = [""]
    for _ in range(3):
        layer = [a + d for a in layer for d in digits]
        candidates.extend(layer)
    if not integer:
        candidates.extend(["0.5", ".5", ".0", "0.0", "5", ".05"])
    # Around the bounds (a minimum of 1234 is not reached by short digit strings).
    for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        b = s.get(name)
        if b is None:
            continue
        outs = []
        for v in (b, b + 1, b - 1, math.ceil(b), math.floor(b)):
            outs.append(str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else repr(float(v)))
        if not integer:
            lo = s.get("minimum", s.get("exclusiveMinimum"))
            hi = s.get("maximum", s.get("exclusiveMaximum"))
            if lo is not None and hi is not None:
                outs.append(repr((lo + hi) / 2))
        for t in outs:
            if t.startswith(prefix):
                candidates.append(t[len(prefix):])
    tried = sorted(set(candidates), key=lambda c: (len(c), c))
    for suffix in tried:
        if _in_bounds(prefix + suffix, s, integer):
            return suffix
    # A longer walk: the prefix then zeros (1 -> 10, 100, ...).
    for n in range(4, 20):
        if _in_bounds(prefix + "0" * n, s, integer):
            return "0" * n
    raise Unwritable(f"no number finishes {prefix!r} within the bounds")


def finish_string(prefix: str, s: Schema) -> str:
    """The shortest text (JSON-escaped, without the closing quote) that ends a string value
    begun with the decoded ``prefix`` validly for the schema branch ``s``."""
    if "const" in s or "enum" in s:
        values = [s["const"]] if "const" in s else s["enum"]
        options = [v for v in values if isinstance(v, str) and v.startswith(prefix)]
        if not options:
            raise Unwritable("no enum value begins so")
        return _escape(min(options, key=len)[len(prefix):])
    pattern = s.get("pattern")
    fmt = s.get("format")
    if pattern is None and fmt is not None:
        if not prefix and fmt in FORMAT_EXAMPLES:
            return FORMAT_EXAMPLES[fmt]
        pattern = FORMAT_PATTERNS.get(fmt)
        if pattern is None:
            raise Unwritable(f"format {fmt}")
    rest = ""
    if pattern is not None:
        rest = shortest_regex_completion(pattern, prefix)
    short = int(s.get("minLength", 0)) - len(prefix) - len(rest)
    if short > 0:
        if pattern is not None:
            raise Unwritable("minLength with a pattern")
        rest += "a" * short
    return _escape(rest)


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


# -- regular expressions: the shortest completion through a small NFA -------------------------

_SAFE = "a0A_-.:@ bzZ9"  # preferred characters for a character class (no JSON escapes)


class _CharSet:
    def __init__(self, items: list[tuple[Any, Any]], negate: bool = False):
        self.items, self.negate = items, negate

    def matches(self, ch: str) -> bool:
        return self._raw(ch) != self.negate

    def _raw(self, ch: str) -> bool:
        c = ord(ch)
        for op, arg in self.items:
            name = str(op)
            if name == "LITERAL" and c == arg:
                return True
            if name == "RANGE" and arg[0] <= c <= arg[1]:
                return True
            if name == "CATEGORY" and _category(str(arg), ch):
                return True
            if name == "ANY" and ch != "\n":
                return True
        return False

    def sample(self) -> str | None:
        for ch in _SAFE:
            if self.matches(ch):
                return ch
        for op, arg in self.items:
            if str(op) == "LITERAL" and not self.negate:
                return chr(arg)
            if str(op) == "RANGE" and not self.negate:
                return chr(arg[0])
        for c in range(0x21, 0x7F):
            if chr(c) not in '"\\' and self.matches(chr(c)):
                return chr(c)
        return None


def _category(name: str, ch: str) -> bool:
    name = name.upper()
    if "NOT_DIGIT" in name:
        return not ch.isdigit()
    if "DIGIT" in name:
        return ch.isdigit()
    if "NOT_WORD" in name:
        return not (ch.isalnum() or ch == "_")
    if "WORD" in name:
        return ch.isalnum() or ch == "_"
    if "NOT_SPACE" in name:
        return not ch.isspace()
    if "SPACE" in name:
        return ch.isspace()
    return False


class _Nfa:
    """Thompson NFA of a parsed regex: edges (charset or None for epsilon, target)."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[_CharSet | None, int]]] = []

    def state(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def build(self, items: Any, start: int) -> int:
        cur = start
        for op, arg in items:
            cur = self._one(str(op), arg, cur)
        return cur

    def _one(self, op: str, arg: Any, start: int) -> int:
        if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            if op == "LITERAL":
                cs = _CharSet([("LITERAL", arg)])
            elif op == "NOT_LITERAL":
                cs = _CharSet([("LITERAL", arg)], negate=True)
            elif op == "ANY":
                cs = _CharSet([("ANY", None)])
            else:
                negate = bool(arg) and str(arg[0][0]) == "NEGATE"
                cs = _CharSet([(str(o), a) for o, a in arg if str(o) != "NEGATE"], negate)
            end = self.state()
            self.edges[start].append((cs, end))
            return end
        if op == "AT":
            return start
        if op == "SUBPATTERN":
            return self.build(arg[-1], start)
        if op == "BRANCH":
            end = self.state()
            for alt in arg[1]:
                s = self.state()
                self.edges[start].append((None, s))
                self.edges[self.build(alt, s)].append((None, end))
            return end
        if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = arg
            cur = start
            for _ in range(min(lo, 64)):
                cur = self.build(sub, cur)
            if hi == _sre.MAXREPEAT or hi - lo > 32:
                loop = self.state()
                self.edges[cur].append((None, loop))
                self.edges[self.build(sub, loop)].append((None, loop))
                return loop
            end = self.state()
            self.edges[cur].append((None, end))
            for _ in range(hi - lo):
                cur = self.build(sub, cur)
                self.edges[cur].append((None, end))
            return end
        if op == "ATOMIC_GROUP":
            return self.build(arg, start)
        raise Unwritable(f"regex feature {op}")

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        out = set(states)
        todo = list(out)
        while todo:
            for cs, t in self.edges[todo.pop()]:
                if cs is None and t not in out:
                    out.add(t)
                    todo.append(t)
        return frozenset(out)


_REGEX_CACHE: dict[str, tuple[_Nfa, int, int]] = {}


def _compile(pattern: str) -> tuple[_Nfa, int, int]:
    hit = _REGEX_CACHE.get(pattern)
    if hit is not None:
        return hit
    try:
        parsed = list(_sre.parse(pattern))
    except Exception as exc:  # noqa: BLE001 - any parse failure: not ours to finish
        raise Unwritable(f"pattern: {exc}") from None
    nfa = _Nfa()
    start = nfa.state()
    anywhere = _CharSet([("ANY", None), ("LITERAL", 10)])
    begin = start
    # JSON-schema patterns search (unanchored) unless they anchor themselves.
    if not (parsed and str(parsed[0][0]) == "AT"):
        nfa.edges[start].append((anywhere, start))
    end = nfa.build(parsed, begin)
    if not (parsed and str(parsed[-1][0]) == "AT"):
        tail = nfa.state()
        nfa.edges[end].append((None, tail))
        nfa.edges[tail].append((anywhere, tail))
        end = tail
    if len(_REGEX_CACHE) > 256:
        _REGEX_CACHE.clear()
    _REGEX_CACHE[pattern] = (nfa, start, end)
    return nfa, start, end


def shortest_regex_completion(pattern: str, prefix: str) -> str:
    """The shortest text that makes ``prefix + text`` match ``pattern`` (JSON-schema search
    semantics: unanchored unless the pattern anchors)."""
    nfa, start, accept = _compile(pattern)
    states = nfa.closure([start])
    for ch in prefix:
        states = nfa.closure(t for s in states for cs, t in nfa.edges[s]
                             if cs is not None and cs.matches(ch))
        if not states:
            raise Unwritable("the string no longer matches its pattern")
    # Breadth-first over NFA states (one character per edge) to the accepting state.
    seen = set(states)
    frontier: list[tuple[int, str]] = [(s, "") for s in sorted(states)]
    while frontier:
        nxt: list[tuple[int, str]] = []
        for s, text in frontier:
            if s == accept:
                return text
        for s, text in frontier:
            for cs, t in nfa.edges[s]:
                if cs is None:
                    continue
                ch = cs.sample()
                if ch is None:
                    continue
                for u in sorted(nfa.closure([t])):
                    if u not in seen:
                        seen.add(u)
                        nxt.append((u, text + ch))
        frontier = nxt
    raise Unwritable("the pattern cannot be completed")


# -- the JSON scanner ---------------------------------------------------------------------------


class _Frame:
    __slots__ = ("kind", "cands", "phase", "keys", "key", "count")

    def __init__(self, kind: str, cands: list[Schema]):
        self.kind = kind            # "obj" or "arr"
        self.cands = cands          # the schema branches still consistent with the text
        self.phase = "open"         # open, key, colon, colon_sp, value, after, comma_sp, item
        self.keys: list[str] = []
        self.key = ""
        self.count = 0

    def copy(self) -> _Frame:
        f = _Frame(self.kind, self.cands)
        f.phase, f.keys, f.key, f.count = self.phase, list(self.keys), self.key, self.count
        return f


class JsonScanner:
    """Where a JSON value being written stands: the open containers (with their schema
    branches), the open string, number or literal. Fed characters; ``done`` once the value
    is complete."""

    def __init__(self, schemas: Schemas, root: Any):
        self.schemas = schemas
        self.root_cands = schemas.branches(root)
        self.stack: list[_Frame] = []
        self.done = False
        self.lex: str | None = None      # "str", "key", "num", "lit"
        self.buf: list[str] = []         # the lexeme's (decoded) characters
        self.esc = ""                    # an escape being read ("\\", "\\u12", ...)
        self.lex_cands: list[Schema] = []

    def copy(self) -> JsonScanner:
        c = JsonScanner.__new__(JsonScanner)
        c.schemas, c.root_cands, c.done = self.schemas, self.root_cands, self.done
        c.stack = [f.copy() for f in self.stack]
        c.lex, c.buf, c.esc, c.lex_cands = self.lex, list(self.buf), self.esc, self.lex_cands
        return c

    # The candidates of the value expected now.
    def _expected(self) -> list[Schema]:
        if not self.stack:
            return self.root_cands
        f = self.stack[-1]
        out: list[Schema] = []
        for c in f.cands:
            sub = self.schemas.prop(c, f.key) if f.kind == "obj" else self.schemas.item(c, f.count)
            try:
                out.extend(self.schemas.branches(sub))
            except Unwritable:
                continue
        return out

    def feed(self, text: str) -> None:
        for ch in text:
            self._char(ch)

    def _char(self, ch: str) -> None:
        if self.done:
            return
        lex = self.lex
        if lex == "str" or lex == "key":
            if self.esc:
                self.esc += ch
                if self.esc[1] != "u":
                    self.buf.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
                                    .get(ch, ch))
                    self.esc = ""
                elif len(self.esc) == 6:
                    try:
                        self.buf.append(chr(int(self.esc[2:], 16)))
                    except ValueError:
                        pass
                    self.esc = ""
            elif ch == "\\":
                self.esc = "\\"
            elif ch == '"':
                text = "".join(self.buf)
                self.lex, self.buf = None, []
                if lex == "key":
                    f = self.stack[-1]
                    f.key, f.phase = text, "colon"
                    kept = [c for c in f.cands if self._key_ok(c, text, f.keys)]
                    f.cands = kept or f.cands
                else:
                    self._value_done(text)
            else:
                self.buf.append(ch)
            return
        if lex == "num":
            if ch in "0123456789.eE+-":
                self.buf.append(ch)
                return
            self.lex, self.buf = None, []
            self._value_done(None)
        elif lex == "lit":
            self.buf.append(ch)
            if "".join(self.buf) in ("true", "false", "null"):
                self.lex, self.buf = None, []
                self._value_done(None)
            return
        self._structural(ch)

    def _key_ok(self, c: Schema, key: str, written: list[str]) -> bool:
        props = c.get("properties") or {}
        return key in props or c.get("additionalProperties", True) is not False

    def _start_value(self, ch: str) -> None:
        cands = self._expected()
        if ch == "{":
            self.stack.append(_Frame("obj", [c for c in cands if _accepts_kind(c, "object")]
                                     or cands))
        elif ch == "[":
            f = _Frame("arr", [c for c in cands if _accepts_kind(c, "array")] or cands)
            f.phase = "open"
            self.stack.append(f)
        elif ch == '"':
            self.lex, self.buf = "str", []
            self.lex_cands = [c for c in cands if _accepts_kind(c, "string")] or cands
        elif ch in "-0123456789":
            self.lex, self.buf = "num", [ch]
            self.lex_cands = [c for c in cands if _accepts_kind(c, "number")] or cands
        elif ch in "tfn":
            self.lex, self.buf = "lit", [ch]
        # anything else: llguidance would not have allowed it; ignore

    def _structural(self, ch: str) -> None:
        if not self.stack:
            self._start_value(ch)
            return
        f = self.stack[-1]
        p = f.phase
        if p in ("open", "after") and ch == ("}" if f.kind == "obj" else "]"):
            self._pop()
        elif p == "after" and ch == ",":
            f.phase = "comma_sp"
        elif p == "comma_sp" and ch == " ":
            f.phase = "key" if f.kind == "obj" else "item"
        elif f.kind == "arr":
            if p in ("open", "item"):
                self._start_value(ch)
        elif p in ("open", "key") and ch == '"':
            self.lex, self.buf = "key", []
        elif p == "colon" and ch == ":":
            f.phase = "colon_sp"
        elif p == "colon_sp" and ch == " ":
            f.phase = "value"
        elif p == "value":
            self._start_value(ch)

    def _pop(self) -> None:
        self.stack.pop()
        self._value_done(None)

    def _value_done(self, string: str | None) -> None:
        if not self.stack:
            self.done = True
            return
        f = self.stack[-1]
        if f.kind == "obj":
            if string is not None:  # keep the branches whose property admits the string
                kept = [c for c in f.cands if _string_ok(self.schemas, self.schemas.prop(c, f.key),
                                                         string)]
                f.cands = kept or f.cands
            f.keys.append(f.key)
        else:
            f.count += 1
        f.phase = "after"

    def end_of_text(self) -> None:
        """A number at the root ends with the text."""
        if self.lex == "num" and not self.stack and self._number_complete():
            self.lex, self.buf = None, []
            self.done = True

    # -- the shortest completion ---------------------------------------------------------------

    def completion(self) -> str:
        return "".join(self.completion_chunks())

    def completion_chunks(self) -> list[str]:
        """The shortest completion, in pieces (whole values apart, so that their token counts
        can be cached)."""
        sim = self.copy()
        out: list[str] = []
        for _ in range(100_000):
            if sim.done:
                return out
            bulk = sim._bulk()
            if bulk is not None:
                out.extend(bulk)
                continue
            chunk = sim._next_chunk()
            out.append(chunk)
            sim.feed(chunk)
            if sim.lex == "num" and not sim.stack:
                sim.end_of_text()
        raise Unwritable("the completion does not end")

    def _shortest_of(self, cands: list[Schema]) -> str:
        return self._best(_try(self.schemas.shortest, cands))

    def _bulk(self) -> list[str] | None:
        """Whole values the completion writes next (the required keys left with their values,
        the items minItems still needs, the value expected), with the state moved past them
        without scanning them; None where the next piece is not a whole value."""
        if self.lex is not None:
            return None
        if not self.stack:
            value = self._shortest_of(self.root_cands)
            self.done = True
            return [value]
        f = self.stack[-1]
        if f.phase in ("value", "item"):
            value = self._shortest_of(self._expected())
            self._value_done(json.loads(value) if value.startswith('"') else None)
            return [value]
        if f.phase not in ("open", "after"):
            return None
        out: list[str] = []
        first = f.phase == "open"
        if f.kind == "obj":
            rest, cand = self._remaining(f)
            if not rest or cand is None:
                return None
            for key in rest:
                out.append(("" if first else ", ") + dumps(key) + ": ")
                out.append(self._shortest_of(self.schemas.branches(self.schemas.prop(cand, key))))
                first = False
            f.keys.extend(rest)
        else:
            need = self._min_items(f)
            if f.count >= need:
                return None
            for index in range(f.count, need):
                out.append("" if first else ", ")
                f.key, f.count = "", index
                out.append(self._shortest_of(self._expected()))
                first = False
            f.count = need
        f.phase = "after"
        return out

    def _number_complete(self) -> bool:
        text = "".join(self.buf)
        return any(_in_bounds(text, c, type_of(c) == "integer") for c in self.lex_cands) or (
            not self.lex_cands and bool(_NUMBER.fullmatch(text)))

    def _best(self, options: Iterable[str]) -> str:
        best: str | None = None
        for o in options:
            if best is None or len(o) < len(best):
                best = o
        if best is None:
            raise Unwritable("nothing can follow")
        return best

    def _next_chunk(self) -> str:
        lex = self.lex
        if lex == "str":
            if self.esc:
                return self.esc_rest()
            prefix = "".join(self.buf)
            return self._best(_try(lambda c: finish_string(prefix, c) + '"',
                                   self.lex_cands or [ANY]))
        if lex == "key":
            if self.esc:
                return self.esc_rest()
            return self._finish_key()
        if lex == "num":
            prefix = "".join(self.buf)
            suffix = self._best(_try(lambda c: finish_number(
                prefix, c, type_of(c) == "integer"), self.lex_cands or [ANY]))
            if not self.stack:
                return suffix
            # Inside a container the number ends with the next structural character.
            ended = self.copy()
            ended.feed(suffix)
            ended.lex, ended.buf = None, []
            ended._value_done(None)
            return suffix + ended._next_chunk()
        if lex == "lit":
            text = "".join(self.buf)
            return self._best(w[len(text):] for w in ("true", "false", "null")
                              if w.startswith(text))
        if not self.stack:
            return self._best(_try(self.schemas.shortest, self.root_cands))
        f = self.stack[-1]
        if f.kind == "obj":
            if f.phase in ("open", "after"):
                rest = self._remaining_keys(f)
                if not rest:
                    return "}"
                return ('' if f.phase == "open" else ", ") + '"'
            if f.phase == "key":
                return '"'
            if f.phase == "colon":
                return ": "
            if f.phase == "colon_sp":
                return " "
            if f.phase == "comma_sp":
                return " "
            if f.phase == "value":
                return self._best(_try(self.schemas.shortest, self._expected()))
        else:
            need = self._min_items(f)
            if f.phase == "open":
                if f.count >= need:
                    return "]"
                return self._best(_try(self.schemas.shortest, self._expected()))
            if f.phase == "after":
                return ", " if f.count < need else "]"
            if f.phase == "comma_sp":
                return " "
            if f.phase == "item":
                return self._best(_try(self.schemas.shortest, self._expected()))
        raise Unwritable(f"unknown state {f.kind}/{f.phase}")

    def esc_rest(self) -> str:
        e = self.esc
        if not e:
            return ""
        if len(e) == 1:
            return "n"
        return "0" * (6 - len(e))

    def _min_items(self, f: _Frame) -> int:
        return min((int(c.get("minItems", 0)) for c in f.cands), default=0)

    def _remaining_keys(self, f: _Frame) -> list[str]:
        return self._remaining(f)[0]

    def _remaining(self, f: _Frame) -> tuple[list[str], Schema | None]:
        """Required keys still to write, for the branch needing the fewest (and that branch)."""
        best: list[str] | None = None
        chosen: Schema | None = None
        for c in f.cands:
            order = list((c.get("properties") or {}).keys())
            last = max((order.index(k) for k in f.keys if k in order), default=-1)
            rest = [k for k in required_order(c) if k not in f.keys
                    and (k not in order or order.index(k) > last)]
            if best is None or len(rest) < len(best):
                best, chosen = rest, c
        return best or [], chosen

    def _finish_key(self) -> str:
        """The rest of the key being written: a required key it can still become, else any
        key the object admits here (declared after the last one written, or any when other
        keys are allowed)."""
        f = self.stack[-1]
        prefix = "".join(self.buf)
        options = [k for k in self._remaining_keys(f) if k.startswith(prefix)]
        if not options:
            for c in f.cands:
                order = list((c.get("properties") or {}).keys())
                last = max((order.index(k) for k in f.keys if k in order), default=-1)
                options.extend(k for k in order[last + 1:] if k.startswith(prefix))
                if c.get("additionalProperties", True) is not False:
                    options.append(prefix)
        key = self._best(options)
        return _escape(key[len(prefix):]) + '"'


def _string_ok(schemas: Schemas, sub: Any, value: str) -> bool:
    try:
        branches = schemas.branches(sub)
    except Unwritable:
        return False
    for b in branches:
        if "const" in b:
            if b["const"] == value:
                return True
        elif "enum" in b:
            if value in b["enum"]:
                return True
        elif _accepts_kind(b, "string"):
            return True
    return False


def _try(fn: Any, cands: Iterable[Schema]) -> Iterable[str]:
    for c in cands:
        try:
            yield fn(c)
        except Unwritable:
            continue


# -- whole outputs: JSON values and tool calls ----------------------------------------------


class Closer:
    """What one grammar spec's outputs need to end: built once per spec.

    ``kind``: "json" (a JSON value, then EOS) or "tools" (tool calls in ``mode`` "auto",
    "required" or "named")."""

    def __init__(self, kind: str, schema: Any, *, mode: str = "", parallel: bool = False):
        self.kind, self.mode, self.parallel = kind, mode, parallel
        self.schemas = Schemas(schema)
        self.root = self.schemas.root
        self.shortest = self.schemas.shortest(self.root)
        if kind == "tools":
            self.shortest = TOOL_CALL_OPEN + self.shortest + TOOL_CALL_CLOSE
        # The most one free token can add to what is left to write: the longest shortest value
        # of any subschema (a value the model may open at will: an optional property, an array
        # item past minItems, a longer alternative) with a key and separators. The root (and
        # for tools each call object) is written once and cannot be opened again.
        skip = {id(self.root)} | {id(b) for b in self.root.get("anyOf", ())}
        longest = 0
        keys = 0
        for s in self.schemas.all_subschemas():
            keys = max([keys, *(len(k) for k in (s.get("properties") or {}))])
            if id(s) in skip:
                continue
            try:
                longest = max(longest, len(self.schemas.shortest(s)))
            except Unwritable:
                continue
        self.jump = longest + keys + 6
        # Tools: a whole call may be opened wherever calls may start.
        self.call_jump = len(self.shortest) if kind == "tools" else 0

    def state(self) -> CloseState:
        return CloseState(self)

    def minimum_output(self) -> str:
        """The shortest whole output (for auto mode: none is needed)."""
        if self.kind == "tools" and self.mode == "auto":
            return ""
        return self.shortest


class CloseState:
    """One sequence's position in its output, fed its text as it is generated."""

    def __init__(self, closer: Closer):
        self.closer = closer
        self.calls = 0
        self.scanner: JsonScanner | None = None
        self.tag = 0        # characters of an opening tag (outside a call) or closing tag
        self.closing = False
        self.text_chars = 0
        if closer.kind == "json":
            self.scanner = JsonScanner(closer.schemas, closer.root)

    def feed(self, text: str) -> None:
        if self.closer.kind == "json":
            assert self.scanner is not None
            self.scanner.feed(text)
            return
        for ch in text:
            self._tool_char(ch)

    def _tool_char(self, ch: str) -> None:
        if self.scanner is not None:
            if not self.closing:
                self.scanner.feed(ch)
                if self.scanner.done:
                    self.closing, self.tag = True, 0
                return
            self.tag = self.tag + 1 if TOOL_CALL_CLOSE[self.tag] == ch else 0
            if self.tag == len(TOOL_CALL_CLOSE):
                self.scanner, self.closing, self.tag = None, False, 0
                self.calls += 1
                self.text_chars = 0
            return
        self.text_chars += 1
        if TOOL_CALL_OPEN[self.tag] == ch:
            self.tag += 1
        else:
            self.tag = 1 if ch == TOOL_CALL_OPEN[0] else 0
        if self.tag == len(TOOL_CALL_OPEN):
            self.tag = 0
            self.scanner = JsonScanner(self.closer.schemas, self.closer.root)

    @property
    def in_call(self) -> bool:
        return self.scanner is not None

    def completion(self) -> str:
        """The shortest text that ends the output here (raises ``Unwritable`` when this module
        cannot tell)."""
        return "".join(self.completion_chunks())

    def completion_chunks(self) -> list[str]:
        closer = self.closer
        if closer.kind == "json":
            assert self.scanner is not None
            sc = self.scanner.copy()
            sc.end_of_text()
            return [] if sc.done else sc.completion_chunks()
        if self.scanner is not None:
            if self.closing:
                return [TOOL_CALL_CLOSE[self.tag:]]
            return [*self.scanner.completion_chunks(), TOOL_CALL_CLOSE]
        if closer.mode == "auto" or (self.calls and not self.text_chars):
            return []  # free text (auto), or calls made and nothing after them (a newline
            # or a tag begun commits to another call)
        return [TOOL_CALL_OPEN[self.tag:], closer.schemas.shortest(closer.root), TOOL_CALL_CLOSE]


def tool_call_schema(tools: dict[str, Any]) -> Schema:
    """The JSON of one call of any of ``tools`` (name -> its closed parameters schema)."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": name},
                                                          "arguments": params},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, params in tools.items()]}
