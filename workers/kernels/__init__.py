"""Compiled CPU kernels of the engine, built from their C++ sources with torch's extension
builder (a C++ compiler and ninja) on first use, and cached: per user by torch
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), under a name that
carries a digest of this CPU's instruction-set flags (they are compiled for it) and of the
sources (headers included, which torch's own check does not read). ``make install`` builds
them once, so no worker pays the ~40 s compile when it starts. They are compiled with OpenMP
for torch's ``at::parallel_for``: the ``libgomp.so.1`` they ask for is the one torch has
already loaded, so they share torch's intra-op threads (one pool, ``torch_threads``).

``cpu()`` returns the module (``paged_decode``: decode attention over the paged KV cache;
``small_linear``: a projection of one or two tokens; ``add_rms_norm``: the residual add and
RMS norm before a layer's blocks; ``silu_mul``: the MLP's activation; ``rope_write_kv``:
RoPE of the queries and keys and the step's keys and values into the cache;
``panels_linear``: float32 projections from the weights in panels of output columns), or
None when it cannot be built here (no compiler): the engine then runs its torch paths, which
compute the same.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "bindings.cpp", _HERE / "paged_decode.cpp", _HERE / "small_linear.cpp",
            _HERE / "rms_norm.cpp", _HERE / "silu_mul.cpp", _HERE / "rope_cache.cpp",
            _HERE / "pairs_linear.cpp", _HERE / "prefill_attention.cpp",
            _HERE / "panels_linear.cpp"]
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def _flags_line() -> str:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them ("" where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines()
                 if line.startswith(("flags", "Features"))), "")


def _tag() -> str:
    """A short digest of this CPU's flags and of the kernels' sources: a build for another
    CPU kind, or of other sources, is never reused."""
    digest = hashlib.sha256()
    digest.update(_flags_line().encode())
    for path in sorted(_HERE.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def decode_head_dim_ok(head_dim: int) -> bool:
    """Whether ``paged_decode`` takes this head size: a multiple of 16, at most 256."""
    return head_dim % 16 == 0 and 0 < head_dim <= 256


def pairs() -> ModuleType | None:
    """The CPU kernels' module where ``pairs_linear`` serves: compiled in, on a CPU with
    AVX512-BF16 (``vdpbf16ps``; steps run on AMX's tiles where the CPU has them, from the same
    copy of the weights)."""
    module = cpu()
    return module if module is not None and module.pairs_linear_available() else None


def prefill() -> ModuleType | None:
    """The CPU kernels' module where ``prefill_attention`` serves: compiled in (AVX512-BF16;
    its products on AMX's tiles where the CPU has them)."""
    module = cpu()
    return module if module is not None and module.prefill_attention_available() else None


def cpu() -> ModuleType | None:
    """The CPU kernels' module, built if need be; None where it cannot be built."""
    with _lock:
        if "cpu" not in _loaded:
            _loaded["cpu"] = _build("cpu", _SOURCES)
        return _loaded["cpu"]


def _build(name: str, sources: list[Path]) -> ModuleType | None:
    try:
        from torch.utils import cpp_extension
        return cpp_extension.load(
            name=f"electron_{name}_{_tag()}", sources=[str(s) for s in sources],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path serves
        log.warning("CPU kernels %s not built (%s: %s); the torch paths serve instead", name,
                    type(exc).__name__, exc)
        return None
