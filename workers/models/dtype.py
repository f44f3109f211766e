"""Which floating-point type the model computes in."""

from __future__ import annotations

from pathlib import Path

import torch

_NAMED = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" -> bfloat16 where the hardware computes it natively, else float32."""
    if name in _NAMED:
        return _NAMED[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r} (expected auto, {', '.join(_NAMED)})")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    # Without AVX512-BF16 or AMX, CPU bf16 matmuls are emulated and slower than fp32.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    return bool(set(cpuinfo("flags").split()) & {"avx512_bf16", "amx_bf16"})


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo ("flags", "vendor_id"); "" where unknown."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return ""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return ""
