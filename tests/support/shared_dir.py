"""Where ``shared/`` (reference schemas the project does not own) lies: beside the checkout,
as CI lays it out, or inside it."""

from __future__ import annotations

from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
CANDIDATES = (_REPO.parent / "shared", _REPO / "shared")


def shared_path(*parts: str) -> Path:
    """The first existing ``shared/<parts>``; FileNotFoundError names where it looked."""
    tried = [base.joinpath(*parts) for base in CANDIDATES]
    found = next((p for p in tried if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{'/'.join(parts)} is not at any of {[str(p) for p in tried]}: "
                                "shared/ must lie beside the checkout")
    return found
