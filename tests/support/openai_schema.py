"""Validates bodies against OpenAI's own JSON schemas (data/openai)."""

from __future__ import annotations

import json
from functools import cache

import jsonschema

from tests.support.data import data_path


@cache
def _validator(root: str) -> jsonschema.Draft202012Validator:
    path = data_path("openai", "chat-completions.schema.json")
    defs = json.loads(path.read_text())["$defs"]
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{root}", "$defs": defs})


def validate(body: dict, root: str) -> None:
    """Raises jsonschema.ValidationError when ``body`` is not a valid ``root`` object."""
    _validator(root).validate(body)
