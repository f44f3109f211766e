"""What glibc's malloc keeps of the engine's freed tensors, and where a step's tensors live.

Two needs pull apart. Between steps, a worker must give back what it freed: glibc raises its
mmap threshold to the size of each large block freed (up to 32 MiB) and keeps up to twice that
free at the top of the heap, and the engine's tensors change shape every step, so freed logits
and activations stayed in a fragmenting heap: a worker held 120-160 MiB more than it used
after 10,000 short requests, swinging by ~70 MiB (bench/README.md, memory soak). Fixed
thresholds keep blocks of 2 MiB and more out of the heap (mmap'd, returned when freed) and
trim its top past 8 MiB: what a step leaves free there stays for the next one, a swing of up
to 8 MiB between steps (trimming past 2 MiB cut the soak's swing from 13.3 to 1.6 MiB on an
AMD EPYC, and measured 0.96x decode tokens/s at batch 16 and 64, inside that VM's noise:
``bench/cpu_paths.py --parts top``).

Within a model's forward pass, the same rule is slow: every tensor of 2 MiB or more becomes a
fresh mapping, page-faulted in again by each operator of each layer (a 1,024-token prefill of
SmolLM2 faulted ~150,000 pages and took 1.45x as long on an Intel Xeon). So the CPU forward
runs inside `step_heap`: blocks up to 64 MiB come from the heap and its top is kept, each
layer reusing what the last one freed; after the forward the thresholds are back and the top
is trimmed. Only the forward's own transients were in the heap, so nothing long-lived is
left between them to fragment it (the logits, which outlive the forward, are made after it).

An operator's MALLOC_*_ variables win; not glibc: nothing to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 2 << 20
TRIM_THRESHOLD = 8 << 20
STEP_MMAP_THRESHOLD = 64 << 20
STEP_TRIM_THRESHOLD = 128 << 20


def _load_libc() -> tuple[Callable[..., int], Callable[..., int], Callable[..., None]] | None:
    """glibc's mallopt, malloc and free; None where they are not (or MALLOC_*_ is set)."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt, alloc, free = libc.mallopt, libc.malloc, libc.free
    except (OSError, AttributeError):
        return None
    alloc.restype = ctypes.c_void_p
    alloc.argtypes = [ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]
    return mallopt, alloc, free


_libc = _load_libc()
_lock = threading.Lock()
_steps_inside = 0  # engine threads inside step_heap (a process may run several engines)


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    if _libc is not None:
        mallopt = _libc[0]
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def bound_retention() -> None:
    """The between-steps thresholds (the worker package sets them on import)."""
    _set(MMAP_THRESHOLD, TRIM_THRESHOLD)


@contextlib.contextmanager
def step_heap() -> Iterator[None]:
    """Blocks up to 64 MiB from the heap, its top kept, until the block ends."""
    global _steps_inside
    if _libc is None:
        yield
        return
    with _lock:
        _steps_inside += 1
        if _steps_inside == 1:
            _set(STEP_MMAP_THRESHOLD, STEP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _steps_inside -= 1
            if _steps_inside == 0:
                _set(MMAP_THRESHOLD, TRIM_THRESHOLD)
                _trim_top()


def _trim_top() -> None:
    """glibc trims a heap's top (past the trim threshold) only when free() gives back a block
    of 64 KiB or more: one such free, so the step's top goes back now, not at some later
    free. Unlike malloc_trim, this leaves the free blocks inside the heap mapped."""
    _, alloc, free = _libc
    block = alloc(64 << 10)
    if block:
        free(block)
