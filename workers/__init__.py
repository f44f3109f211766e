"""Worker side: the engine, the model, the worker actor and its gRPC service."""

import os

# oneDNN (torch's CPU matmul backend) caches compiled primitives per input shape, and a
# serving engine's batch shape changes nearly every step: at its default (1,024 entries) the
# cache grew a worker by ~320 MiB over 1,000 mixed requests. Disabling it made prefill ~40 %
# slower, so it is bounded instead; an operator's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")


def _bound_malloc_retention() -> None:
    """glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB)
    and keeps up to twice that free at the top of the heap: the engine's tensors change shape
    every step, so freed logits and activations stayed in the heap, fragmented, and a worker
    held 120-160 MiB more than it used after 10,000 short requests, swinging by ~70 MiB
    (bench/README.md, memory soak). Fixed thresholds keep blocks of 2 MiB and more out of
    the heap (mmap'd, returned when freed) and trim its top past 8 MiB. An operator's
    MALLOC_*_ variables win; not glibc: nothing to do.

    The threshold is a trade: every mmap'd block is page-faulted in again on each use. At
    1 MiB a 1,024-token prefill of SmolLM2 took ~30 % longer than with glibc's own threshold
    (its 2-6 MB activations all faulted in, layer after layer); at 2 MiB it is within ~5 %,
    and the soak still holds (4.6 MiB of growth, bound 10; 4 MiB: 13.4, 16 MiB: 74). The
    torch attention path also gathers each step's keys and values into buffers that every
    layer refills (workers/models/attention.py)."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 2 << 20)
    mallopt(m_trim_threshold, 8 << 20)


_bound_malloc_retention()
