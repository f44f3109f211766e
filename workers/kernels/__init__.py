"""Compiled CPU kernels of the engine, built from their C++ sources with torch's extension
builder (a C++ compiler and ninja) on first use, and cached: per user by torch
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), under a name that
includes this CPU's instruction-set flags, since they are compiled for it. ``make install``
builds them once, so no worker pays the ~30 s compile when it starts. They are compiled with
OpenMP for torch's ``at::parallel_for``: the ``libgomp.so.1`` they ask for is the one torch
has already loaded, so they share torch's intra-op threads (one pool, ``torch_threads``).

``paged_decode()`` returns the module, or None when it cannot be built here (no compiler):
the engine then runs its torch path, which computes the same attention.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.cpp")
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def _cpu_tag() -> str:
    """A short digest of this CPU's flags: a build for another CPU kind is never reused."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "any"
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))),
                 "")
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def decode_head_dim_ok(head_dim: int) -> bool:
    """Whether ``paged_decode`` takes this head size: whole vectors of 16 floats, at most 16."""
    return head_dim % 16 == 0 and 0 < head_dim <= 256


def paged_decode() -> ModuleType | None:
    """The paged decode attention kernel (``paged_decode.cpp``), built if need be."""
    with _lock:
        if "paged_decode" not in _loaded:
            _loaded["paged_decode"] = _build("paged_decode", _SOURCE)
        return _loaded["paged_decode"]


def _build(name: str, source: Path) -> ModuleType | None:
    try:
        from torch.utils import cpp_extension
        return cpp_extension.load(
            name=f"electron_{name}_{_cpu_tag()}", sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path serves
        log.warning("CPU kernel %s not built (%s: %s); the torch path serves instead", name,
                    type(exc).__name__, exc)
        return None

