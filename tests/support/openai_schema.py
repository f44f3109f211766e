"""Validates bodies against OpenAI's own JSON schemas (shared/openai)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

_CANDIDATES = [
    Path(__file__).resolve().parents[3] / "shared" / "openai" / "chat-completions.schema.json",
    Path(__file__).resolve().parents[2] / "shared" / "openai" / "chat-completions.schema.json",
]


@cache
def _validator(root: str) -> jsonschema.Draft202012Validator:
    path = next((p for p in _CANDIDATES if p.is_file()), None)
    if path is None:  # CI lays shared/ beside the clone, as in development
        raise FileNotFoundError(f"OpenAI's schema is not at any of {_CANDIDATES}: "
                                "shared/ must lie beside the checkout")
    defs = json.loads(path.read_text())["$defs"]
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{root}", "$defs": defs})


def validate(body: dict, root: str) -> None:
    """Raises jsonschema.ValidationError when ``body`` is not a valid ``root`` object."""
    _validator(root).validate(body)
