"""Where the data the project does not own lies: the repository's ``data/`` folder
(reference schemas and public traces, each with its source and licence beside it)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"


def data_path(*parts: str) -> Path:
    """``data/<parts>``; FileNotFoundError when the checkout lacks it."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: data/ ships with the repository")
    return path
