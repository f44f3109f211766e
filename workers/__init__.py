"""Worker side: the engine, the model, the worker actor and its gRPC service."""

import os

# oneDNN (torch's CPU matmul backend) caches compiled primitives per input shape, and a
# serving engine's batch shape changes nearly every step: at its default (1,024 entries) the
# cache grew a worker by ~320 MiB over 1,000 mixed requests. Disabling it made prefill ~40 %
# slower, so it is bounded instead; an operator's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")


from . import malloc  # noqa: E402

malloc.bound_retention()
