"""What tools and structured output cost the router per request and per streamed delta.

Measures, in one process and one run: validating a request without tools (the baseline),
with three tools, and with a pydantic-derived json_schema (first sight of a schema, and
again: verdicts are cached per schema text); building the grammar spec and the prompt's
template inputs; and the tool-call parser per delta (4-character deltas of a filler sentence
and one call). Writes bench/results/tool_router_costs.json with the command and load average.

    python bench/tool_router_costs.py [--out bench/results/tool_router_costs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai.lib._pydantic import to_strict_json_schema  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from core import json_schema_subset  # noqa: E402
from router.openai.schemas import parse_chat_request  # noqa: E402
from router.tools.grammar_spec import grammar_spec, tool_use  # noqa: E402
from router.tools.parser import ToolCallParser  # noqa: E402
from router.tools.prompt import template_inputs  # noqa: E402
from tests.support.schemas import TOOLS  # noqa: E402


class Ingredient(BaseModel):
    name: str = Field(max_length=16)
    grams: int = Field(ge=1, le=1000)


class Recipe(BaseModel):
    title: str
    vegetarian: bool
    difficulty: Literal["easy", "medium", "hard"]
    ingredients: list[Ingredient]


def per_call_us(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/tool_router_costs.json")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    n = args.repeats
    user = [{"role": "user", "content": "What's the weather in Paris?"}]
    plain = {"model": "electron", "messages": user}
    with_tools = {**plain, "tools": TOOLS, "tool_choice": "required"}
    schema = to_strict_json_schema(Recipe)
    with_schema = {**plain, "response_format": {"type": "json_schema", "json_schema": {
        "name": "Recipe", "schema": schema, "strict": True}}}

    def uncached() -> None:
        json_schema_subset._check_text.cache_clear()
        parse_chat_request(with_schema, max_messages=200)

    req = parse_chat_request(with_tools, max_messages=200)
    text = ("Let me check that for you. " '<tool_call>{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}</tool_call>')
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    names = frozenset({"get_weather"})

    def parse_stream() -> None:
        p = ToolCallParser(names)
        for piece in pieces:
            p.feed(piece)
        p.finish()

    results: dict[str, Any] = {
        "validate_no_tools_us": per_call_us(lambda: parse_chat_request(plain, max_messages=200),
                                            n),
        "validate_3_tools_us": per_call_us(lambda: parse_chat_request(with_tools,
                                                                      max_messages=200), n),
        "validate_pydantic_schema_first_sight_us": per_call_us(uncached, max(n // 10, 10)),
        "validate_pydantic_schema_cached_us": per_call_us(
            lambda: parse_chat_request(with_schema, max_messages=200), n),
        "grammar_spec_and_prompt_3_tools_us": per_call_us(
            lambda: (grammar_spec(req, tool_use(req)),
                     template_inputs(req, tool_use(req), template_supports_tools=False)), n),
        "tool_parser_per_delta_us": per_call_us(parse_stream, n * 10) / len(pieces),
    }
    results = {k: round(v, 2) for k, v in results.items()}
    results["validate_3_tools_vs_no_tools_ratio"] = round(
        results["validate_3_tools_us"] / results["validate_no_tools_us"], 1)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "load_average_1_5_15": list(os.getloadavg()), "python": platform.python_version(),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
