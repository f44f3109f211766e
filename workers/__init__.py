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
    (bench/README.md, memory soak). Fixed thresholds keep blocks of 1 MiB and more out of
    the heap (mmap'd, returned when freed) and trim its top past 8 MiB. An operator's
    MALLOC_*_ variables win; not glibc: nothing to do."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 8 << 20)


_bound_malloc_retention()
